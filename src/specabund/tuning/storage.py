"""Where a study lives, which worker owns which trial, and how trials are counted.

Storage specifications (``--storage`` / ``[tuning] storage``):

``""`` (default)
    ``sqlite:///<results>/hyperopt/<study_name>.db``: one process at a time (several work, but SQLite
    locks the whole file and may answer "database is locked" under load).
``path/to/study.db`` (``.db``, ``.sqlite``, ``.sqlite3``)
    that SQLite file.
``path/to/study.log`` (``.log``, ``.journal``, ``.jsonl``)
    an optuna :class:`~optuna.storages.JournalStorage` with a
    :class:`~optuna.storages.journal.JournalFileBackend` (an append-only file with a lock file next to
    it): the choice for several processes on one machine or a shared (NFS) disk.
``postgresql://...``, ``mysql://...``, ``sqlite:///...``
    an RDB URL, used as it is (with optuna's heartbeat, so that trials of a worker that died on another
    machine are failed after ``HEARTBEAT_GRACE_S`` seconds).

Trials record the worker that runs them (host, pid, process start time) in their user attributes. A trial
left RUNNING by a process of this host that no longer exists (killed, crashed machine restarted) is
marked FAIL by the next worker and does not count (its parameters are queued again); trials of live
processes, or of other hosts, are left alone (on RDB storage the heartbeat handles other hosts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import psutil
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ..errors import SpecabundError

logger = logging.getLogger(__name__)

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 300
#: Trial states that count towards ``n_trials``.
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class StorageError(SpecabundError):
    """The study's storage failed (full disk, locked or damaged database, lost connection)."""


@contextlib.contextmanager
def storage_errors(desc: str) -> Iterator[None]:
    """Turn optuna's and SQLAlchemy's storage errors into one-line :class:`StorageError` naming ``desc``."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        orig = getattr(cause, "orig", None)  # the database driver's own error
        reason = str(orig if orig is not None else cause).strip().splitlines() or [type(cause).__name__]
        raise StorageError(f"tuning storage {desc}: {reason[0]}") from exc


def resolve_storage(spec: str | None, default_dir: Path, study_name: str) -> tuple[str, str]:
    """Normalise a storage specification to ``(kind, location)``.

    Parameters
    ----------
    spec : str or None
        See the module docstring; relative paths are taken as given (callers resolve them first).
    default_dir : Path
        Folder of the default SQLite file.
    study_name : str
        Name of the default SQLite file.

    Returns
    -------
    kind, location : str
        ``('journal', path)`` or ``('rdb', url)``.
    """
    if not spec:
        path = Path(default_dir) / f"{study_name}.db"
        return "rdb", f"sqlite:///{path.resolve()}"
    if "://" in spec:
        return "rdb", spec
    path = Path(spec)
    if path.suffix.lower() in JOURNAL_SUFFIXES:
        return "journal", str(path.resolve())
    if path.suffix.lower() in SQLITE_SUFFIXES:
        return "rdb", f"sqlite:///{path.resolve()}"
    raise optuna.exceptions.OptunaError(
        f"storage {spec!r}: use a .db/.sqlite file (SQLite), a .log/.journal file (journal, several "
        "processes) or an RDB URL such as postgresql://user@host/db"
    )


def make_storage(spec: str | None, default_dir: Path, study_name: str) -> tuple[BaseStorage, str]:
    """Open the storage named by ``spec`` (creating folders and files as needed).

    Returns
    -------
    storage : optuna.storages.BaseStorage
    description : str
        ``'journal:/abs/path.log'`` or the RDB URL.
    """
    kind, loc = resolve_storage(spec, default_dir, study_name)
    if kind == "journal":
        Path(loc).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(loc)), f"journal:{loc}"
    if loc.startswith("sqlite:///"):
        Path(loc[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the heartbeat arguments are flagged experimental by optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            loc,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            engine_kwargs={"connect_args": {"timeout": 60}} if loc.startswith("sqlite") else None,
        )
    return storage, loc


def worker_identity() -> dict[str, Any]:
    """``{'host', 'pid', 'pid_start'}`` of this process (stored on every trial it runs)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": round(psutil.Process().create_time(), 2),
    }


def owner_alive(trial: FrozenTrial, me: dict[str, Any] | None = None) -> bool | None:
    """Whether the process that runs ``trial`` still exists.

    Returns ``None`` when that cannot be told: no worker recorded, or a worker on another host.
    """
    me = me or worker_identity()
    owner = trial.user_attrs.get("worker")
    if not isinstance(owner, dict) or "pid" not in owner:
        return None
    if owner.get("host") != me["host"]:
        return None
    pid = int(owner["pid"])
    try:
        proc = psutil.Process(pid)
        started = round(proc.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if proc.status() == psutil.STATUS_ZOMBIE:
        return False
    return abs(started - float(owner.get("pid_start", started))) < 1.0


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker process on this host is gone; return their numbers.

    The parameters such a trial had drawn are enqueued (``study.enqueue_trial``), so the next trial
    evaluates them: a killed run resumes with the trial it was killed in.
    """
    me = worker_identity()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(t, me) is False:
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except (ValueError, RuntimeError) as exc:  # finished meanwhile by its owner or another worker
                logger.debug("could not fail trial %d: %s", t.number, exc)
                continue
            study.set_user_attr(f"stale_trial_{t.number}", "failed: its worker process was gone")
            if t.params:  # evaluated next, as the uninterrupted run would have
                study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            failed.append(t.number)
    if failed:
        logger.info("marked %d trial(s) of dead workers as FAIL: %s", len(failed), failed)
    return failed


def count_done(study: optuna.Study) -> int:
    """COMPLETE + PRUNED trials (what ``n_trials`` counts)."""
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))


def count_claimed(study: optuna.Study, before: int | None = None) -> int:
    """Done trials plus RUNNING trials (of live or unknown workers), optionally with number < ``before``."""
    trials = study.get_trials(deepcopy=False, states=(*DONE_STATES, TrialState.RUNNING))
    if before is not None:
        trials = [t for t in trials if t.number < before]
    me = worker_identity()
    return sum(1 for t in trials if t.state != TrialState.RUNNING or owner_alive(t, me) is not False)
