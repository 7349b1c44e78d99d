"""The working directory and its runtime folders (created on demand, never inside the package), and the
lock that keeps two runs out of one output folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import LockedError, OutputError
from .utils import ensure_dir

try:  # POSIX: the kernel drops the lock when its process dies, so a lock is never stale
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: ``[paths]`` keys and their default folder names (``configs/default.toml``).
DEFAULT_PATHS: dict[str, str] = {
    "fits_dir": "fits",
    "processed_dir": "processed_data",
    "models_dir": "models",
    "results_dir": "results",
    "logs_dir": "logs",
    "plots_dir": "plots",
}
RUNTIME_FOLDERS: tuple[str, ...] = tuple(DEFAULT_PATHS.values())

#: Name of the lock file a running command keeps in its output folder.
LOCK_FILE = ".specabund.lock"

#: Folders of each stage's results under ``[paths] results_dir``.
RESULT_FOLDERS: dict[str, str] = {
    "evaluation": "evaluation",
    "prediction": "predictions",
    "tuning": "hyperopt",
    "baseline": "baseline",
    "feature_importance": "feature_importance",
    "residual_analysis": "residual_analysis",
}
#: Suffix of every per-batch results folder (:class:`~specabund.tracking.BatchTracker`).
BATCH_RESULTS_SUFFIX = "_batch_results"
#: File names of the preprocessed datasets under ``[paths] processed_dir``.
DATASET_FILES: dict[str, str] = {
    "reference": "reference_dataset.npz",
    "train": "train_dataset.npz",
    "val": "val_dataset.npz",
    "test": "test_dataset.npz",
    "prediction": "prediction_dataset.npz",
}
#: ``best_params.toml`` of ``specabund tune`` in the tuning folder.
TUNED_PARAMS_FILE = "best_params.toml"


def result_folder(results_dir: str | Path, stage: str) -> Path:
    """The folder of ``stage``'s results (a key of :data:`RESULT_FOLDERS`) under ``results_dir``."""
    try:
        return Path(results_dir) / RESULT_FOLDERS[stage]
    except KeyError:
        raise ValueError(f"unknown result stage {stage!r}; known: {', '.join(RESULT_FOLDERS)}") from None


def batch_results_dir(parent: str | Path, stage: str | None, name: str) -> Path:
    """The per-batch results folder of ``name``: ``<parent>/<stage>_<name>_batch_results``.

    Parameters
    ----------
    parent : path
        The folder holding it (the results folder, or an analysis folder).
    stage : str or None
        ``'training'``, ``'evaluation'``, ``'prediction'``, ``'baseline'``; ``None`` for the per-label folders
        inside an analysis folder (``<parent>/<name>_batch_results``).
    name : str
        What the batches are about: a label, labels joined by ``_``, or ``<label>_<model>``.
    """
    prefix = f"{stage}_" if stage else ""
    return Path(parent) / f"{prefix}{name}{BATCH_RESULTS_SUFFIX}"


def find_batch_results(parent: str | Path, stage: str | None) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every :func:`batch_results_dir` of ``stage`` under ``parent``, sorted."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    prefix = f"{stage}_" if stage else ""
    out = []
    for folder in sorted(parent.glob(f"{prefix}*{BATCH_RESULTS_SUFFIX}")):
        name = folder.name[len(prefix) : -len(BATCH_RESULTS_SUFFIX)]
        if name and folder.is_dir():
            out.append((name, folder))
    return out


def tracking_name(labels: list[str]) -> str:
    """What a training run's batch folder is named after: its abundances (else all labels), joined."""
    abund = [lab for lab in labels if lab.endswith("_FE")] or labels
    return "_".join(abund)


def run_name(labels: list[str]) -> str:
    """Default name of a new training run: up to four abundances and a UTC time stamp."""
    abund = [lab for lab in labels if lab.endswith("_FE")] or labels
    return f"{'_'.join(abund[:4])}{'_etc' if len(abund) > 4 else ''}_{timestamp()}"


@dataclass(frozen=True)
class Workspace:
    """Paths of the runtime folders under ``root``, named by ``[paths]``.

    Every run, result and batch-results folder name is built here. Each folder accessor creates its folder
    (and the given sub-folders) on first use; a folder that cannot be created raises
    :class:`~specabund.errors.OutputError` naming it and the cause. Absolute ``[paths]`` entries are used
    as given, relative ones are taken under ``root``.

    Parameters
    ----------
    root : Path
        The working directory (``--workdir``).
    fits_dir, processed_dir, models_dir, results_dir, logs_dir, plots_dir : str
        The ``[paths]`` section.
    """

    root: Path
    fits_dir: str = DEFAULT_PATHS["fits_dir"]
    processed_dir: str = DEFAULT_PATHS["processed_dir"]
    models_dir: str = DEFAULT_PATHS["models_dir"]
    results_dir: str = DEFAULT_PATHS["results_dir"]
    logs_dir: str = DEFAULT_PATHS["logs_dir"]
    plots_dir: str = DEFAULT_PATHS["plots_dir"]

    @classmethod
    def from_config(cls, root: str | Path, paths: Mapping[str, Any] | None = None) -> Workspace:
        """A workspace at ``root`` with the ``[paths]`` section ``paths`` (missing keys: defaults)."""
        return cls(Path(root)).with_paths(paths)

    def with_paths(self, paths: Mapping[str, Any] | None) -> Workspace:
        """This workspace with the folder names of a ``[paths]`` section."""
        given = {k: str(v) for k, v in (paths or {}).items() if k in DEFAULT_PATHS and v is not None}
        return replace(self, **given) if given else self

    def _dir(self, name: str, *sub: str) -> Path:
        return ensure_dir(self.resolve(name).joinpath(*sub))

    def fits(self, *sub: str) -> Path:
        return self._dir(self.fits_dir, *sub)

    def processed(self, *sub: str) -> Path:
        return self._dir(self.processed_dir, *sub)

    def models(self, *sub: str) -> Path:
        return self._dir(self.models_dir, *sub)

    def results(self, *sub: str) -> Path:
        return self._dir(self.results_dir, *sub)

    def logs(self, *sub: str) -> Path:
        return self._dir(self.logs_dir, *sub)

    def plots(self, *sub: str) -> Path:
        return self._dir(self.plots_dir, *sub)

    def resolve(self, path: str | Path) -> Path:
        """``path`` as given when absolute, else relative to the workspace root."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    # ------------------------------------------------------------------ names (no folder is created)

    @property
    def models_path(self) -> Path:
        """The models folder (not created)."""
        return self.resolve(self.models_dir)

    @property
    def results_path(self) -> Path:
        """The results folder (not created)."""
        return self.resolve(self.results_dir)

    @property
    def plots_path(self) -> Path:
        """The plots folder (not created)."""
        return self.resolve(self.plots_dir)

    def dataset_path(self, kind: str) -> Path:
        """A preprocessed dataset (``'reference'``, ``'train'``, ``'val'``, ``'test'``, ``'prediction'``)."""
        return self.resolve(self.processed_dir) / DATASET_FILES[kind]

    def manifest_path(self) -> Path:
        """``manifest.json`` of the preprocessed data."""
        return self.resolve(self.processed_dir) / "manifest.json"

    def run_dir(self, name: str) -> Path:
        """The folder of training run ``name`` under the models folder."""
        return self.models_path / name

    def log_file(self, stage: str) -> Path:
        """A new log file ``<logs>/<stage>/<stage>_<timestamp>.log`` (not created)."""
        return self.resolve(self.logs_dir) / stage / f"{stage}_{timestamp()}.log"

    def result_dir(self, stage: str) -> Path:
        """The results folder of ``stage`` (a key of :data:`RESULT_FOLDERS`; created)."""
        return ensure_dir(result_folder(self.results_path, stage))

    def tuned_params(self) -> Path:
        """``best_params.toml`` written by ``specabund tune`` (may not exist)."""
        return result_folder(self.results_path, "tuning") / TUNED_PARAMS_FILE

    def batch_results(self, stage: str, name: str) -> Path:
        """``<results>/<stage>_<name>_batch_results`` (created)."""
        return ensure_dir(batch_results_dir(self.results_path, stage, name))


def timestamp() -> str:
    """UTC time stamp for run and log names, e.g. ``20261129-101500``."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------------------------ lock

# folders this process holds, with a use count (a command may lock one folder twice)
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _pid_alive(pid: int, started: float | None) -> bool:
    """Whether process ``pid`` runs and (when ``started`` is known) is the one that started then."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) < 2.0
    except Exception:
        return False


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another specabund command"
    who = f"'{info.get('command', 'specabund')}' (pid {info.get('pid', '?')}"
    if info.get("host") and info.get("host") != socket.gethostname():
        who += f" on {info['host']}"
    return who + f", started {info.get('started', '?')})"


class FolderLock:
    """Exclusive use of an output folder by one running command.

    The lock is the file ``.specabund.lock`` in the folder, holding who took it (command, pid, host, start
    time). On POSIX systems it is also ``flock``-ed, so the kernel releases it when its process dies, even
    on ``kill -9``: a lock file left behind by a dead process is taken over silently (logged). Without
    ``flock`` (Windows, some network file systems) a lock whose process no longer runs on this host is
    taken over. Re-entrant within one process.

    Parameters
    ----------
    folder : path
        The output folder (created if needed).
    command : str
        What holds it, shown to a second command that is refused (e.g. ``'specabund predict'``).

    Raises
    ------
    LockedError
        On :meth:`acquire`, when another live process holds the folder.
    """

    def __init__(self, folder: str | Path, command: str = "specabund") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self._key = ""
        self._fd: int | None = None

    def _info(self) -> str:
        started = None
        with contextlib.suppress(Exception):
            import psutil

            started = psutil.Process(os.getpid()).create_time()
        return json.dumps(
            {
                "command": self.command,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "process_created": started,
            }
        )

    def _refuse(self, info: dict[str, Any]) -> LockedError:
        return LockedError(
            f"{self.folder} is in use by {_describe(info)}; wait for it to finish or choose another "
            f"output folder (if no such process runs, delete {self.path})"
        )

    def acquire(self) -> FolderLock:
        """Take the lock (see the class docstring); return ``self``."""
        ensure_dir(self.folder)
        self._key = str(self.folder.resolve())
        with _HELD_GUARD:
            if self._key in _HELD:
                fd, count = _HELD[self._key]
                _HELD[self._key] = (fd, count + 1)
                return self
        fd = self._acquire_flock() if fcntl is not None else self._acquire_pidfile()
        with _HELD_GUARD:
            _HELD[self._key] = (fd, 1)
        return self

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, self._info().encode())

    def _acquire_flock(self) -> int:
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(self.folder, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(_read_info(self.path)) from None
            except OSError as exc:  # no flock on this file system: fall back to the pid file
                os.close(fd)
                logger.debug("flock unavailable on %s (%s); using the pid check", self.path, exc)
                return self._acquire_pidfile()
            try:  # a holder releasing its lock unlinks the file: make sure we locked the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_info(self.path)
            if old:
                logger.info(
                    "taking over the lock of %s left by %s, which has ended", self.folder, _describe(old)
                )
            try:
                self._write(fd)
            except OSError as exc:
                os.close(fd)
                raise OutputError(self.folder, exc) from exc
            return fd
        raise LockedError(f"{self.folder}: could not take the lock {self.path} (it keeps changing)")

    def _acquire_pidfile(self) -> int:
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                old = _read_info(self.path)
                same_host = old.get("host") in (None, socket.gethostname())
                pid = old.get("pid")
                if isinstance(pid, int) and same_host and not _pid_alive(pid, old.get("process_created")):
                    logger.info("taking over the stale lock of %s left by %s", self.folder, _describe(old))
                    stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
                    with contextlib.suppress(OSError):
                        os.replace(self.path, stale)
                        stale.unlink()
                    continue
                raise self._refuse(old) from None
            except OSError as exc:
                raise OutputError(self.folder, exc) from exc
            try:
                self._write(fd)
            except OSError as exc:
                os.close(fd)
                raise OutputError(self.folder, exc) from exc
            return fd
        raise LockedError(f"{self.folder}: could not take the lock {self.path} (it keeps changing)")

    def release(self) -> None:
        """Give the lock back (the last release of this process removes the lock file)."""
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is None:
                return
            fd, count = held
            if count > 1:
                _HELD[self._key] = (fd, count - 1)
                return
            del _HELD[self._key]
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
