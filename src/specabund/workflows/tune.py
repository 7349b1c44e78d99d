"""The ``tune`` workflow: run or resume the optuna study and write its report."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    parse_settings,
    save_config,
)
from ..errors import SpecabundError
from ..workspace import FolderLock, Workspace
from .common import RESOLVED_CONFIG, choose_labels, load_training_data

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- tune


@dataclass
class TuneOutcome:
    """What :func:`tune_run` did: the tuning folder, the report summary and the study's trials."""

    out_dir: Path
    summary: dict[str, Any]
    ran: list[int] = field(default_factory=list)
    n_done: int = 0


def tune_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str | None,
    *,
    data_path: str | Path | None = None,
    elements: Sequence[str] = (),
    worker_id: int | None = None,
    report_only: bool = False,
    command: str = "specabund tune",
) -> TuneOutcome:
    """The ``tune`` workflow: run (or resume) the study and write its report (see
    :mod:`specabund.tuning`).

    Parameters
    ----------
    workspace : Workspace
        The working directory (folder names from ``cfg['paths']``).
    cfg : mapping
        The resolved configuration (``[tuning]``, ``[tuning_space]``, ``[model]``, ``[training]``).
    device : str or None
        The resolved device (not needed with ``report_only``).
    data_path : path, optional
        Reference dataset, or a train file with ``val_dataset.npz`` beside it (default: the reference
        dataset under ``processed_dir``).
    elements : sequence of str
        Labels (default ``data.elements``, else every abundance), chosen like ``train`` does.
    worker_id : int, optional
        Part of every trial's sampler seed (give each concurrent worker its own).
    report_only : bool
        Only rewrite the report of the existing study.
    command : str
        Named in the lock file (SQLite storage serves one process: its folder is locked).
    """
    import optuna

    from ..tuning import SearchSpace, TuneOptions, open_study, run_tuning, write_report
    from ..tuning.storage import resolve_storage

    settings = parse_settings(cfg)
    ws = workspace.with_paths(cfg["paths"])
    storage_spec = settings.tuning.storage
    if storage_spec and "://" not in storage_spec:
        storage_spec = str(ws.resolve(storage_spec))
    options = TuneOptions.from_config(cfg["tuning"], worker_id=worker_id, storage=storage_spec)
    out_dir = ws.result_dir("tuning")
    space = SearchSpace.from_config(cfg["tuning_space"], settings.tuning.group_ratios)
    try:
        _, desc = resolve_storage(options.storage, out_dir, options.study_name)
    except optuna.exceptions.OptunaError as exc:
        raise SpecabundError(f"tuning.storage: {exc}") from exc
    # SQLite serves one process: a second tune into the same results is refused (journal and RDB
    # storages are meant to be shared by several workers)
    lock = FolderLock(out_dir, command) if desc.startswith("sqlite:") else None
    if lock is not None:
        lock.acquire()
    try:
        outcome = TuneOutcome(out_dir=out_dir, summary={})
        if report_only:
            study, desc = open_study(options, out_dir)
            if not study.get_trials(deepcopy=False):
                raise SpecabundError(
                    f"study {options.study_name!r} in {desc} has no trials; run `specabund tune` first"
                )
            outcome.summary = write_report(study, out_dir, space=space, storage=desc, seed=options.seed)
        else:
            if device is None:
                raise SpecabundError("tune_run needs the device to train on")
            path = ws.resolve(data_path) if data_path is not None else ws.dataset_path("reference")
            train_ds, val_ds, _ = load_training_data(path)
            requested = tuple(elements) or tuple(settings.data.elements)
            labels = choose_labels(
                requested, list(train_ds.elements), settings.data.include_stellar_parameters
            )
            base_model = settings.model_config()
            base_train = settings.train_config(device)
            logger.info(
                "tuning %s on %d training / %d validation spectra (%s), study %r in %s",
                ",".join(labels),
                len(train_ds),
                len(val_ds),
                device,
                options.study_name,
                desc,
            )
            result = run_tuning(train_ds, val_ds, labels, space, base_model, base_train, options, out_dir)
            outcome.summary = write_report(
                result.study,
                out_dir,
                space=space,
                model_name=base_model.name,
                storage=result.storage,
                seed=options.seed,
            )
            outcome.ran, outcome.n_done = list(result.ran), int(result.n_done)
            logger.info("this process finished trials %s; the study holds %d", result.ran, result.n_done)
        save_config(cfg, out_dir / RESOLVED_CONFIG)
    finally:
        if lock is not None:
            lock.release()
    return outcome
