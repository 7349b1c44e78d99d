"""The ``train`` workflow: plan a run (folder, configuration, data), then train it."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    default_config,
    dotted_to_nested,
    load_config,
    merge,
    read_toml,
    save_config,
    validate,
)
from ..errors import SpecabundError
from ..utils import atomic_write_json
from ..workspace import FolderLock, Workspace, run_name, tracking_name
from .common import RESOLVED_CONFIG, build_configs, choose_labels, load_training_data

if TYPE_CHECKING:  # pragma: no cover
    from ..training import TrainResult

logger = logging.getLogger(__name__)


#: What ``train`` was asked for, kept in the run folder so that ``--resume RUN`` alone continues it.
TRAIN_ARGS_FILE = "train_args.json"


def run_config(
    run_dir: Path | None, config_file: str | Path | None, overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The resolved configuration of a training run.

    On resume the run's own ``resolved_config.toml`` replaces the defaults (then ``config_file``, then the
    ``overrides``), so a resumed run is configured like its first attempt.
    """
    resolved = run_dir / RESOLVED_CONFIG if run_dir is not None else None
    if resolved is None or not resolved.exists():
        return load_config(config_file, overrides)
    cfg = merge(default_config(), read_toml(resolved), source=str(resolved))
    if config_file is not None:
        cfg = merge(cfg, read_toml(config_file), source=str(config_file))
    if overrides:
        cfg = merge(cfg, dotted_to_nested(overrides), source="command line")
    validate(cfg)
    return cfg


def read_train_args(run_dir: Path) -> dict[str, Any]:
    """The arguments an interrupted run was started with (``train_args.json``; empty when absent)."""
    path = run_dir / TRAIN_ARGS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecabundError(f"{path}: cannot read the arguments of the interrupted run ({exc})") from exc
    return data if isinstance(data, dict) else {}


def check_fresh_run_dir(run_dir: Path) -> None:
    """Raise :class:`SpecabundError` when ``run_dir`` already holds a finished or interrupted run."""
    from ..runs import is_partial_run, is_run_dir

    if is_run_dir(run_dir):
        raise SpecabundError(
            f"{run_dir} already holds a training run (finished); choose another --run-name, or replace it "
            "with --overwrite"
        )
    if is_partial_run(run_dir):
        raise SpecabundError(
            f"{run_dir} already holds a training run (interrupted); continue it with --resume "
            f"{run_dir.name}, or start afresh with --overwrite"
        )


# --------------------------------------------------------------------------------------------- train


@dataclass
class TrainingPlan:
    """Everything a training run needs before the device is chosen (see :func:`plan_training`).

    Attributes
    ----------
    workspace : Workspace
        The workspace, with the ``[paths]`` of ``cfg``.
    cfg : dict
        The resolved configuration.
    data_path : Path
        The training data.
    elements : tuple of str
        The labels asked for.
    run_dir : Path or None
        The run folder (None: named after the labels when the run starts).
    resume, overwrite : bool
        Continue the run in ``run_dir`` / replace it.
    init_from : Path or None
        The parent run to fine-tune from.
    config_file : str or None
        The user configuration file (recorded with the run).
    """

    workspace: Workspace
    cfg: dict[str, Any]
    data_path: Path
    elements: tuple[str, ...]
    run_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    init_from: Path | None = None
    config_file: str | None = None

    @property
    def device_request(self) -> str:
        """``training.device`` of the configuration (``'auto'``, ``'cpu'`` or ``'cuda'``)."""
        return str(self.cfg["training"]["device"])


@dataclass
class TrainOutcome:
    """What :func:`run_training` did.

    Attributes
    ----------
    run_dir : Path
        The saved run.
    results : list of TrainResult
        One per model (ensemble members in order).
    labels : list of str
        The labels trained.
    plot_dir : Path
        The training batch-results folder (curves, per-epoch rows).
    model_name : str
        The architecture.
    n_train, n_val : int
        Spectra in the training and validation splits.
    device : str
        The device trained on.
    """

    run_dir: Path
    results: list[TrainResult]
    labels: list[str]
    plot_dir: Path
    model_name: str
    n_train: int
    n_val: int
    device: str


def plan_training(
    workspace: Workspace,
    data_path: str | Path | None = None,
    elements: Sequence[str] = (),
    *,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: str | None = None,
    run_name: str | None = None,
    overwrite: bool = False,
    init_from: str | Path | None = None,
) -> TrainingPlan:
    """Resolve the run folder, configuration, data path and labels of a training run.

    Parameters
    ----------
    workspace : Workspace
        The working directory (its folder names are replaced by ``[paths]`` of the configuration).
    data_path : path, optional
        Training data (relative: under the workspace); default: the resumed run's data, else the
        reference dataset under ``[paths] processed_dir``.
    elements : sequence of str
        Labels (default: the resumed run's, else every abundance).
    config_file : path, optional
        User TOML overlaying the defaults.
    overrides : mapping, optional
        ``'section.key' -> value`` (the command-line flags; ``None`` values ignored).
    resume : str, optional
        Continue this run (name under the models folder, or a path).
    run_name : str, optional
        Folder name of a new run under the models folder.
    overwrite : bool
        Replace an existing run of that name.
    init_from : str or path, optional
        Fine-tune from this trained run.

    Raises
    ------
    SpecabundError
        A bad run name, a run folder that is taken, an unknown run to resume or fine-tune from.
    """
    from ..runs import resolve_resumable, resolve_run

    if resume and overwrite:
        raise SpecabundError("--resume continues a run, --overwrite replaces it: give one of them")
    ws = workspace.with_paths(load_config(config_file, overrides)["paths"])
    run_dir: Path | None = None
    stored: dict[str, Any] = {}
    elements = tuple(elements)
    if resume:
        run_dir = resolve_resumable(ws.models(), resume)
        stored = read_train_args(run_dir)
        if data_path is None and stored.get("data_path"):
            data_path = Path(stored["data_path"])
        if not elements and stored.get("elements"):
            elements = tuple(str(e) for e in stored["elements"])
    elif run_name is not None:
        if not run_name.strip() or Path(run_name).name != run_name or run_name in (".", ".."):
            raise SpecabundError(f"--run-name {run_name!r} must be a plain folder name (no path separators)")
        run_dir = ws.models() / run_name
        if not overwrite:
            check_fresh_run_dir(run_dir)
    cfg = run_config(run_dir if resume else None, config_file, overrides)
    ws = ws.with_paths(cfg["paths"])
    parent: Path | None = None
    if init_from:
        parent = resolve_run(ws.models(), init_from)
    elif resume and stored.get("init_from"):
        parent = Path(stored["init_from"])
    path = ws.resolve(data_path) if data_path is not None else ws.dataset_path("reference")
    return TrainingPlan(
        workspace=ws,
        cfg=cfg,
        data_path=path,
        elements=elements,
        run_dir=run_dir,
        resume=bool(resume),
        overwrite=overwrite,
        init_from=parent,
        config_file=str(config_file) if config_file else None,
    )


def _preprocess_extra(data_path: Path, preprocess_hash: str) -> dict[str, Any]:
    """The preprocessing options of the training data (from its manifest), stored with the model."""
    extra: dict[str, Any] = {"training_data": str(data_path)}
    manifest = data_path.with_name("manifest.json")
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if m.get("preprocess_hash") == preprocess_hash:
                extra["preprocess_options"] = {**m["options"], "normalize": m["settings"]["normalize"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning(
                "%s: unreadable (%s); the model will not carry the preprocessing options", manifest, exc
            )
    return extra


def run_training(
    plan: TrainingPlan,
    device: str,
    *,
    num_threads: int | None = None,
    progress: bool = False,
    command: str = "specabund train",
) -> TrainOutcome:
    """Train (or resume, or fine-tune) the run of ``plan`` on ``device``.

    Writes the run folder (weights, checkpoints, ``config.json``, ``resolved_config.toml``,
    ``train_args.json``) and the training batch-results folder; holds the run folder's lock meanwhile.

    Parameters
    ----------
    plan : TrainingPlan
        From :func:`plan_training`.
    device : str
        The resolved device (``'cpu'``, ``'cuda'``, ``'cuda:1'``).
    num_threads : int, optional
        ``torch`` threads during training (default ``training.num_threads``; 0 keeps the current value).
    progress : bool
        Show progress bars.
    command : str
        Named in the lock file (who holds the run folder).
    """
    from ..training import distributed
    from ..training.trainer import train, train_ensemble

    ws, cfg = plan.workspace, plan.cfg
    tr, va, _ = load_training_data(plan.data_path)
    labels = choose_labels(plan.elements, tr.elements, cfg["data"]["include_stellar_parameters"])
    model_cfg, train_cfg, ensemble = build_configs(cfg, device, num_threads)
    run_dir = plan.run_dir
    if run_dir is None:
        run_dir = ws.models() / run_name(labels)
        if not plan.overwrite:
            check_fresh_run_dir(run_dir)
    run_dir = distributed.same_on_all_ranks(run_dir)  # torchrun: rank 0's (time-stamped) folder
    primary = distributed.is_primary()  # under torchrun rank 0 alone locks, writes and reports
    with FolderLock(run_dir, command) if primary else contextlib.nullcontext():
        if not plan.resume and not plan.overwrite:
            check_fresh_run_dir(run_dir)  # again, now that no one else can write it
        name = tracking_name(labels)
        plot_dir = ws.batch_results("training", name)
        logger.info(
            "training %s on %d spectra (val %d), labels %s, device %s",
            model_cfg.name,
            len(tr),
            len(va),
            labels,
            device,
        )
        extra = _preprocess_extra(plan.data_path, tr.preprocess_hash)
        args: dict[str, Any] = {
            "data_path": str(plan.data_path),
            "elements": list(plan.elements),
            "labels": labels,
            "config_file": plan.config_file,
            "ensemble": ensemble,
        }
        if plan.init_from is not None:
            args["init_from"] = str(plan.init_from)
        recorded = {"done": False}

        def record_run(epoch: int, row: dict[str, Any]) -> bool:
            # the resolved configuration and the request are written with the first checkpoint, never before
            if not recorded["done"]:
                save_config(cfg, run_dir / RESOLVED_CONFIG)
                atomic_write_json(run_dir / TRAIN_ARGS_FILE, args)
                recorded["done"] = True
            return False

        kw: dict[str, Any] = dict(
            resume=plan.resume,
            plot_dir=plot_dir,
            progress=progress,
            name=name,
            overwrite=plan.overwrite,
            extra_config=extra,
            callbacks=[record_run],
        )
        if ensemble > 1:
            results = train_ensemble(
                tr, va, labels, model_cfg, train_cfg, run_dir, ensemble, init_from=plan.init_from, **kw
            )
        else:
            results = [train(tr, va, labels, model_cfg, train_cfg, run_dir, init_from=plan.init_from, **kw)]
        if primary and not (run_dir / RESOLVED_CONFIG).exists():
            save_config(cfg, run_dir / RESOLVED_CONFIG)
    return TrainOutcome(
        run_dir=run_dir,
        results=results,
        labels=labels,
        plot_dir=plot_dir,
        model_name=model_cfg.name,
        n_train=len(tr),
        n_val=len(va),
        device=str(device),
    )
