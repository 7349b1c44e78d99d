"""The workflows of the commands (``train``, ``test``, ``predict``, ``analyze``, ``tune``) as functions.

A workflow resolves the run folder, the configuration, the data and the labels, runs the stage, writes its
outputs (atomically) and returns what happened; the command line only parses options, sets up logging,
threads and the device, calls these functions and prints the outcome. Nothing here prints, configures
logging, seeds a global random generator or picks a device: the caller passes the device.

Every folder name comes from :class:`~specabund.workspace.Workspace` (``[paths]`` of the configuration).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import (
    default_config,
    dotted_to_nested,
    load_config,
    merge,
    parse_settings,
    read_toml,
    save_config,
    validate,
)
from .errors import SpecabundError
from .utils import atomic_write, atomic_write_json
from .workspace import FolderLock, Workspace, run_name, tracking_name

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .dataset import Dataset
    from .models import ModelConfig
    from .training import TrainConfig, TrainResult

logger = logging.getLogger(__name__)

#: What ``train`` was asked for, kept in the run folder so that ``--resume RUN`` alone continues it.
TRAIN_ARGS_FILE = "train_args.json"
#: The resolved configuration written beside every run's outputs.
RESOLVED_CONFIG = "resolved_config.toml"
#: Rows per tracked batch of the evaluation's per-label batch results.
EVALUATION_BATCH = 1000

__all__ = [
    "ANALYSIS_TYPES",
    "RESOLVED_CONFIG",
    "TRAIN_ARGS_FILE",
    "AnalysisPlan",
    "EvaluationOutcome",
    "PredictionOutcome",
    "TrainOutcome",
    "TrainingPlan",
    "TuneOutcome",
    "build_configs",
    "calibrate_run",
    "choose_labels",
    "evaluate_run",
    "load_training_data",
    "plan_analysis",
    "plan_training",
    "predict_run",
    "preprocess_run",
    "run_analysis",
    "run_config",
    "run_training",
    "tune_run",
]


# --------------------------------------------------------------------------------------------- helpers


def load_training_data(data_path: str | Path) -> tuple[Dataset, Dataset, Dataset | None]:
    """The (train, val, test-or-None) splits of a dataset.

    Parameters
    ----------
    data_path : path
        A reference dataset (split by its ``split`` column), or a train file with ``val_dataset.npz`` (and
        optionally ``test_dataset.npz``) beside it.

    Raises
    ------
    SpecabundError
        When no validation rows can be found.
    """
    from .dataset import SPLIT_CODES, load_dataset

    data_path = Path(data_path)
    ds = load_dataset(data_path)
    if (ds.split == SPLIT_CODES["val"]).any() and (ds.split == SPLIT_CODES["train"]).any():
        test = ds.split_subset("test")
        return ds.split_subset("train"), ds.split_subset("val"), test if len(test) else None
    val_path = data_path.with_name("val_dataset.npz")
    if not val_path.exists():
        raise SpecabundError(
            f"{data_path}: no validation rows in it and no val_dataset.npz beside it; pass the reference "
            "dataset written by 'specabund preprocess' or a train file with val_dataset.npz next to it"
        )
    test_path = data_path.with_name("test_dataset.npz")
    return ds, load_dataset(val_path), load_dataset(test_path) if test_path.exists() else None


def choose_labels(requested: Sequence[str], available: Sequence[str], include_params: bool) -> list[str]:
    """Requested labels (default: every abundance), then Teff, logg and [Fe/H] when present and wanted.

    Parameters
    ----------
    requested : sequence of str
        Labels asked for (empty: every abundance, or every label when the data has no abundance).
    available : sequence of str
        The dataset's labels.
    include_params : bool
        Add the stellar parameters present in the data.
    """
    from .elements import STELLAR_PARAMETERS, resolve_labels

    available = list(available)
    # every abundance by default; a dataset without any (e.g. a LASP catalogue) learns its parameters
    abund = [a for a in available if a not in STELLAR_PARAMETERS] or list(available)
    labels = resolve_labels(list(requested) or None, available if requested else abund, what="dataset labels")
    if include_params:
        labels += [p for p in STELLAR_PARAMETERS if p in available and p not in labels]
    return labels


def build_configs(
    cfg: Mapping[str, Any], device: str, num_threads: int | None = None
) -> tuple[ModelConfig, TrainConfig, int]:
    """ModelConfig, TrainConfig and ensemble size of a configuration (through the typed schema).

    Parameters
    ----------
    cfg : mapping
        The configuration (nested dict, e.g. from :func:`~specabund.config.load_config`).
    device : str
        The resolved device.
    num_threads : int, optional
        ``torch`` threads during training (default ``training.num_threads``; 0 keeps the current value).
    """
    settings = parse_settings(cfg)
    return (
        settings.model_config(),
        settings.train_config(device, num_threads=num_threads),
        settings.ensemble,
    )


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
    from .runs import is_partial_run, is_run_dir

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
    from .runs import resolve_resumable, resolve_run

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
    from .training.trainer import train, train_ensemble

    ws, cfg = plan.workspace, plan.cfg
    tr, va, _ = load_training_data(plan.data_path)
    labels = choose_labels(plan.elements, tr.elements, cfg["data"]["include_stellar_parameters"])
    model_cfg, train_cfg, ensemble = build_configs(cfg, device, num_threads)
    run_dir = plan.run_dir
    if run_dir is None:
        run_dir = ws.models() / run_name(labels)
        if not plan.overwrite:
            check_fresh_run_dir(run_dir)
    if plan.init_from is not None and ensemble > 1:
        raise SpecabundError("--init-from fine-tunes a single model; drop --ensemble")
    with FolderLock(run_dir, command):
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
            results = train_ensemble(tr, va, labels, model_cfg, train_cfg, run_dir, ensemble, **kw)
        else:
            results = [train(tr, va, labels, model_cfg, train_cfg, run_dir, init_from=plan.init_from, **kw)]
        if not (run_dir / RESOLVED_CONFIG).exists():
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


# --------------------------------------------------------------------------------------------- test


@dataclass
class EvaluationOutcome:
    """What :func:`evaluate_run` did.

    Attributes
    ----------
    run_dir : Path
        The evaluated model run.
    out_dir : Path
        The evaluation folder (``metrics.csv``, ``predictions.csv``, plots, ``resolved_config.toml``).
    labels : list of str
        The labels evaluated.
    n_spectra : int
        Spectra evaluated.
    result : dict
        What :func:`specabund.training.evaluate.evaluate` returned (``metrics`` per label and bin, files).
    verdicts : DataFrame or None
        The CNN's rows of the comparison with the labels-only baseline (when baselines exist).
    information_limit : DataFrame or None
        RMSE against the Cramer-Rao bound (with ``truth``).
    """

    run_dir: Path
    out_dir: Path
    labels: list[str]
    n_spectra: int
    result: dict[str, Any]
    verdicts: pd.DataFrame | None = None
    information_limit: pd.DataFrame | None = field(default=None)


def evaluate_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    data_path: str | Path | None = None,
    model: str | Path | None = None,
    elements: Sequence[str] = (),
    truth: str | Path | None = None,
    isochrones: str | Path | None = None,
    command: str = "specabund test",
) -> EvaluationOutcome:
    """The ``test`` workflow: evaluate a trained run on held-out data.

    Writes the evaluation folder, the per-label evaluation batch results, the CNN rows of the baseline
    comparison and, with ``truth``, ``information_limit.csv``.

    Parameters
    ----------
    workspace : Workspace
        The working directory (its folder names are replaced by ``cfg['paths']``).
    cfg : mapping
        The resolved configuration.
    device : str
        The resolved device.
    data_path : path, optional
        The data (its test split when it has one); default the test dataset under ``processed_dir``.
    model : str or path, optional
        Run name under the models folder, or a path (default: the newest run).
    elements : sequence of str
        Labels to evaluate (default: every label of the model).
    truth : path, optional
        Simulator ``truth.csv``: also report RMSE against the Cramer-Rao bound.
    isochrones : path, optional
        MIST ``.iso`` file drawn on the Kiel diagrams.
    command : str
        Named in the lock file of the evaluation folder.
    """
    from .dataset import load_dataset
    from .elements import resolve_labels
    from .runs import resolve_run
    from .training.evaluate import evaluate
    from .training.saved import load_model

    ws = workspace.with_paths(cfg["paths"])
    run_dir = resolve_run(ws.models(), model)
    loaded = load_model(run_dir, device)
    ds = load_dataset(ws.resolve(data_path) if data_path is not None else ws.dataset_path("test"))
    if (ds.split == 2).any() and (ds.split != 2).any():
        ds = ds.split_subset("test")
    labels = resolve_labels(list(elements) or None, loaded.labels, what=f"labels of model {run_dir.name}")
    out = ws.result_dir("evaluation")
    ev = cfg["evaluation"]
    with FolderLock(out, command):
        res = evaluate(
            loaded,
            ds,
            labels,
            out,
            snr_bins=ev["snr_bins"],
            logg_split=ev["logg_split"],
            isochrones=Path(isochrones) if isochrones is not None else None,
        )
        save_config(cfg, out / RESOLVED_CONFIG)
        evaluation_batches(ws, out, labels)
        verdicts = cnn_comparison_rows(ws, out, labels, ev["snr_bins"])
        limit = None
        if truth is not None:
            limit = information_limit(ws.resolve(truth), ds, out, labels, ev["snr_bins"])
    return EvaluationOutcome(
        run_dir=run_dir,
        out_dir=out,
        labels=labels,
        n_spectra=len(ds),
        result=res,
        verdicts=verdicts,
        information_limit=limit,
    )


def evaluation_batches(ws: Workspace, out: Path, labels: Sequence[str]) -> None:
    """Per-batch metrics rows in the evaluation batch-results folders (from ``predictions.csv``)."""
    import pandas as pd

    from .metrics import regression_metrics
    from .tracking import BatchTracker

    pred = pd.read_csv(out / "predictions.csv")
    for lab in labels:
        tracker = BatchTracker(ws.batch_results("evaluation", lab), lab)
        for k, start in enumerate(range(0, len(pred), EVALUATION_BATCH), start=1):
            part = pred.iloc[start : start + EVALUATION_BATCH]
            m = regression_metrics(part[f"{lab}_true"].to_numpy(), part[f"{lab}_pred"].to_numpy())
            m["median_err"] = float(np.nanmedian(part[f"{lab}_err"])) if len(part) else float("nan")
            tracker.record(k, m)
        tracker.finalize(["rmse", "robust_scatter", "bias", "r2", "median_err"])


def cnn_comparison_rows(
    ws: Workspace, out: Path, labels: Sequence[str], snr_bins: Sequence[float]
) -> pd.DataFrame | None:
    """Add the CNN to the baseline comparison table (same test split); return its labels-only verdicts."""
    try:
        from .baselines.comparison import labels_only_verdicts, update_comparison
    except ImportError:
        return None
    import pandas as pd

    from .metrics import metrics_by_snr

    pred = pd.read_csv(out / "predictions.csv")
    rows = []
    for lab in labels:
        if not lab.endswith("_FE"):
            continue
        by = metrics_by_snr(pred[f"{lab}_true"], pred[f"{lab}_pred"], pred["snr"], list(snr_bins))
        for bin_name, m in by.items():
            rows.append(
                {
                    "model": "cnn",
                    "element": lab,
                    "snr_bin": bin_name,
                    **{k: m[k] for k in ("n", "rmse", "robust_scatter", "bias", "r2")},
                }
            )
    if not rows:
        return None
    table = update_comparison(ws.results_path, rows)
    verdicts = labels_only_verdicts(table[table["model"] == "cnn"])
    return verdicts[verdicts["verdict"].astype(bool)] if len(verdicts) else verdicts


def information_limit(
    truth: Path, ds: Dataset, out: Path, labels: Sequence[str], snr_bins: Sequence[float]
) -> pd.DataFrame:
    """RMSE against the Cramer-Rao bound of the simulator, written to ``information_limit.csv``."""
    import pandas as pd

    from .crb import cramer_rao_bounds, information_limit_table, load_truth

    labels = list(labels)
    pred = pd.read_csv(out / "predictions.csv")
    t = load_truth(truth, ds)
    bounds = cramer_rao_bounds(t, ds.ivar, ds.wavelength, labels)
    y_true = pred[[f"{lab}_true" for lab in labels]].to_numpy()
    y_pred = pred[[f"{lab}_pred" for lab in labels]].to_numpy()
    table = information_limit_table(y_true, y_pred, bounds, ds.snr, labels, list(snr_bins))
    with atomic_write(out / "information_limit.csv", "w", encoding="utf-8", newline="") as fh:
        table.to_csv(fh, index=False)
    return table


# --------------------------------------------------------------------------------------------- predict


@dataclass
class PredictionOutcome:
    """What :func:`predict_run` or :func:`calibrate_run` did.

    Attributes
    ----------
    run_dir : Path
        The model run.
    out_dir : Path
        The output folder.
    summary : dict
        ``summary.json`` of a prediction, or the calibration report.
    input : Path or None
        The dataset predicted (or calibrated on); None for raw files.
    """

    run_dir: Path
    out_dir: Path
    summary: dict[str, Any]
    input: Path | None = None


def _prediction_target(
    ws: Workspace, model: str | Path | None, device: str, output_dir: str | Path | None
) -> tuple[Path, Any, Path]:
    from .runs import resolve_run
    from .training.saved import load_model

    run_dir = resolve_run(ws.models_path, model)
    predictor = load_model(run_dir, device)
    out = ws.resolve(output_dir) if output_dir is not None else ws.result_dir("prediction")
    return run_dir, predictor, out


def predict_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    data_path: str | Path | None = None,
    fits_dir: str | Path | None = None,
    files: str | None = None,
    catalog: str | Path | None = None,
    model: str | Path | None = None,
    output_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    mc_samples: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    apply_calibration: bool = True,
    preprocess_config: str | Path | None = None,
    n_workers: int = 1,
    chunk_size: int = 10000,
    plots: bool = True,
    command: str = "specabund predict",
) -> PredictionOutcome:
    """The ``predict`` workflow: a catalogue for a dataset or raw FITS files (see
    :func:`specabund.predict.run_prediction` for the outputs).

    Parameters
    ----------
    workspace : Workspace
        The working directory (folder names from ``cfg['paths']``).
    cfg : mapping
        The resolved configuration (written beside the catalogue).
    device : str
        The resolved device.
    data_path : path, optional
        A preprocessed dataset (default: the prediction dataset under ``processed_dir``).
    fits_dir, files : optional
        Raw FITS: a folder, or a glob / text file listing paths (instead of ``data_path``).
    catalog : path, optional
        CSV naming raw spectra (spec, rv, group, reference labels).
    model : str or path, optional
        Run name or path (default: the newest run).
    output_dir : path, optional
        Output folder (default: the prediction results folder).
    labels, ensemble_mode, mc_samples, batch_size, seed, apply_calibration, chunk_size, plots
        See :func:`specabund.predict.run_prediction`.
    preprocess_config : path, optional
        ``manifest.json`` of the model's training data.
    n_workers : int
        Processes preprocessing raw files.
    command : str
        Named in the lock file of the output folder.
    """
    from .config import dumps
    from .dataset import load_dataset
    from .predict import (
        PredictionInputs,
        collect_files,
        read_prediction_catalog,
        resolve_preprocess,
        run_prediction,
    )

    if sum(x is not None for x in (data_path, fits_dir, files)) > 1:
        raise SpecabundError("give only one of data_path, fits_dir and files")
    ws = workspace.with_paths(cfg["paths"])
    run_dir, predictor, out = _prediction_target(ws, model, device, output_dir)
    settings: dict[str, Any] = {
        "model": str(run_dir),
        "device": str(device),
        "mc_samples": mc_samples,
        "batch_size": batch_size,
        "seed": seed,
        "ensemble_mode": ensemble_mode,
    }
    path: Path | None = None
    with FolderLock(out, command):
        if fits_dir is not None or files is not None:
            paths, root = collect_files(ws.resolve(fits_dir) if fits_dir is not None else None, files)
            opts, normalize, source = resolve_preprocess(
                predictor,
                ws.resolve(preprocess_config) if preprocess_config is not None else None,
                [ws.manifest_path()],
            )
            cat = read_prediction_catalog(ws.resolve(catalog)) if catalog is not None else None
            inputs = PredictionInputs.from_fits(
                paths, opts, normalize=normalize, catalog=cat, fits_dir=root, n_workers=n_workers
            )
            settings.update(input=str(fits_dir or files), preprocess_options_from=source)
        else:
            path = ws.resolve(data_path) if data_path is not None else ws.dataset_path("prediction")
            inputs = PredictionInputs.from_dataset(load_dataset(path))
            settings.update(input=str(path))
        summary = run_prediction(
            predictor,
            inputs,
            out,
            labels=list(labels) if labels else None,
            ensemble_mode=ensemble_mode,
            n_samples=mc_samples,
            batch_size=batch_size,
            seed=seed,
            apply_calibration=apply_calibration,
            batch_root=ws.results(),
            chunk_size=chunk_size,
            plots=plots,
            extra={"settings": settings},
            extra_files={RESOLVED_CONFIG: "# resolved specabund configuration\n" + dumps(cfg)},
        )
    return PredictionOutcome(run_dir=run_dir, out_dir=out, summary=summary, input=path)


def calibrate_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    data_path: str | Path | None = None,
    model: str | Path | None = None,
    output_dir: str | Path | None = None,
    train_data: str | Path | None = None,
    test_data: str | Path | None = None,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    mc_samples: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    method: str = "coverage",
    plots: bool = True,
    command: str = "specabund predict",
) -> PredictionOutcome:
    """Fit the uncertainty calibration and OOD reference of a run (``specabund predict --calibrate``).

    Stores ``calibration.json``/``ood_reference.npz`` in the run folder and writes
    ``calibration_report.json`` (and the pull histograms) to the output folder.

    Parameters
    ----------
    data_path : path, optional
        The validation dataset (default: ``val_dataset.npz`` under ``processed_dir``).
    train_data, test_data : path, optional
        OOD/label-range reference and held-out coverage check (default: beside ``data_path``, when there).
    method : {'coverage', 'mad'}
        See :func:`specabund.predict.calibration.fit_scale`.

    Other parameters are those of :func:`predict_run`.
    """
    from .dataset import load_dataset
    from .plotting import save_figure
    from .predict import calibrate
    from .predict.plots import z_histogram_figure

    ws = workspace.with_paths(cfg["paths"])
    run_dir, predictor, out = _prediction_target(ws, model, device, output_dir)
    settings = {
        "model": str(run_dir),
        "device": str(device),
        "mc_samples": mc_samples,
        "batch_size": batch_size,
        "seed": seed,
        "ensemble_mode": ensemble_mode,
    }
    val_path = ws.resolve(data_path) if data_path is not None else ws.dataset_path("val")
    tr = ws.resolve(train_data) if train_data else val_path.parent / "train_dataset.npz"
    te = ws.resolve(test_data) if test_data else val_path.parent / "test_dataset.npz"
    with FolderLock(out, command), FolderLock(run_dir, command):  # the calibration is stored with the model
        res = calibrate(
            predictor,
            load_dataset(val_path),
            train_dataset=load_dataset(tr) if tr.exists() else None,
            test_dataset=load_dataset(te) if te.exists() else None,
            labels=list(labels) if labels else None,
            ensemble_mode=ensemble_mode,
            n_samples=mc_samples,
            batch_size=batch_size,
            seed=seed,
            method=method,
        )
        report = {**res.report, "val_data": str(val_path), "settings": settings}
        report["train_data"] = str(tr) if tr.exists() else None
        report["test_data"] = str(te) if te.exists() else None
        atomic_write_json(out / "calibration_report.json", report)
        if plots and res.z_val is not None:
            fig = z_histogram_figure(res.labels, res.z_val, res.scale, res.z_test)
            save_figure(fig, out / "calibration_z_histograms.png")
        save_config(cfg, out / RESOLVED_CONFIG)
    return PredictionOutcome(run_dir=run_dir, out_dir=out, summary=report, input=val_path)


# --------------------------------------------------------------------------------------------- analyze

#: ``specabund analyze --type`` values.
ANALYSIS_TYPES = ("feature_importance", "residual_analysis", "both")


@dataclass
class AnalysisPlan:
    """The model, data and labels of an analysis (see :func:`plan_analysis`)."""

    workspace: Workspace
    cfg: dict[str, Any]
    run_dir: Path
    model: Any
    data_path: Path
    dataset: Dataset
    labels: list[str]
    kinds: list[str]


def plan_analysis(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    elements: Sequence[str] = (),
    analysis_type: str = "both",
    model: str | Path | None = None,
    data_path: str | Path | None = None,
) -> AnalysisPlan:
    """Load the model and data of ``specabund analyze`` and choose the labels.

    Labels default to every abundance the model predicts (else all its labels); ``data_path`` to the test
    dataset under ``processed_dir``.
    """
    from .dataset import load_dataset
    from .elements import is_abundance, normalize_label
    from .runs import resolve_run
    from .training.saved import load_model

    if analysis_type not in ANALYSIS_TYPES:
        raise SpecabundError(f"analysis type {analysis_type!r}; choose from {', '.join(ANALYSIS_TYPES)}")
    ws = workspace.with_paths(cfg["paths"])
    run_dir = resolve_run(ws.models_path, model)
    loaded = load_model(run_dir, device)
    path = ws.resolve(data_path) if data_path is not None else ws.dataset_path("test")
    if not path.exists():
        raise SpecabundError(f"{path}: no such dataset; run 'specabund preprocess' or give --data-path")
    ds = load_dataset(path)
    loaded.check_compatible(ds)
    if elements:
        labels = [normalize_label(e) for e in elements]
        unknown = [lab for lab in labels if lab not in loaded.labels]
        if unknown:
            raise SpecabundError(
                f"model {run_dir.name} does not predict {unknown}; it predicts {loaded.labels}"
            )
    else:
        labels = [lab for lab in loaded.labels if is_abundance(lab)] or list(loaded.labels)
    kinds = ["feature_importance", "residual_analysis"] if analysis_type == "both" else [analysis_type]
    return AnalysisPlan(ws, dict(cfg), run_dir, loaded, path, ds, labels, kinds)


AnalysisHook = Callable[[str, str, Any], None]


def run_analysis(
    plan: AnalysisPlan,
    *,
    save_batch_results: bool = False,
    on_result: AnalysisHook | None = None,
    command: str = "specabund analyze",
) -> list[tuple[str, str, Any]]:
    """Run the analyses of ``plan``; return ``(kind, label, result)`` per analysis.

    ``result`` is an :class:`~specabund.analysis.runner.AnalysisResult`, or ``None`` for a residual
    analysis skipped because the data hold no true values of the label. ``on_result(kind, label, result)``
    is called as each one finishes. Each analysis folder gets the resolved configuration.
    """
    from .analysis import ImportanceSettings, run_feature_importance, run_residual_analysis

    cfg, ws, ds = plan.cfg, plan.workspace, plan.dataset
    acfg = cfg["analysis"]
    settings = ImportanceSettings.from_mapping(acfg)
    batch = int(acfg["analysis_batch_size"])
    max_n = int(acfg["max_spectra"]) or None
    seed = int(cfg["data"]["seed"])
    done: list[tuple[str, str, Any]] = []
    for kind in plan.kinds:
        out = ws.result_dir(kind)
        with FolderLock(out, command):
            for lab in plan.labels:
                res: Any = None
                if kind == "feature_importance":
                    res = run_feature_importance(
                        plan.model, ds, lab, out, settings=settings, batch_size=batch,
                        save_batch_results=save_batch_results, max_spectra=max_n, seed=seed,
                    )  # fmt: skip
                elif lab in ds.elements:
                    res = run_residual_analysis(
                        plan.model, ds, lab, out, batch_size=batch, save_batch_results=save_batch_results,
                        max_spectra=max_n, seed=seed, snr_bins=tuple(cfg["evaluation"]["snr_bins"]),
                    )  # fmt: skip
                done.append((kind, lab, res))
                if on_result is not None:
                    on_result(kind, lab, res)
            save_config(cfg, out / RESOLVED_CONFIG)
    return done


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

    from .tuning import SearchSpace, open_study, run_tuning, write_report
    from .tuning.storage import resolve_storage

    settings = parse_settings(cfg)
    ws = workspace.with_paths(cfg["paths"])
    storage_spec = settings.tuning.storage
    if storage_spec and "://" not in storage_spec:
        storage_spec = str(ws.resolve(storage_spec))
    options = settings.tune_options(worker_id=worker_id, storage=storage_spec)
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


# --------------------------------------------------------------------------------------------- preprocess


def preprocess_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    *,
    reference_csv: str | Path | None = None,
    prediction_csv: str | Path | None = None,
    fits_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    n_workers: int | None = None,
    use_cache: bool = True,
    clear_cache: bool = False,
    plots: bool = True,
    progress: bool = False,
    command: str = "specabund preprocess",
) -> tuple[Path, dict[str, Any]]:
    """The ``preprocess`` workflow: FITS files into training-ready datasets.

    Parameters
    ----------
    workspace : Workspace
        The working directory (folder names from ``cfg['paths']``).
    cfg : mapping
        The resolved configuration (``[preprocess]``, ``[data]``; written beside the datasets).
    reference_csv, prediction_csv : path, optional
        The label catalogues (at least one).
    fits_dir, output_dir : path, optional
        Default: ``[paths] fits_dir`` and ``processed_dir``.
    n_workers : int, optional
        Worker processes (default ``preprocess.n_workers``).
    use_cache, clear_cache : bool
        Read and keep / first delete the per-chunk cache.
    plots : bool
        Write the preprocessing plots under the plots folder.
    progress : bool
        Show progress bars.
    command : str
        Named in the lock file of the output folder.

    Returns
    -------
    output_dir : Path
        Where the datasets went.
    manifest : dict
        Counts, labels, rejections and options.
    """
    from .catalog import CatalogRules
    from .preprocess import PipelineSettings, run_preprocess

    if reference_csv is None and prediction_csv is None:
        raise SpecabundError("give a reference catalogue, a prediction catalogue or both")
    settings = parse_settings(cfg)
    ws = workspace.with_paths(cfg["paths"])
    pipe, data = settings.pipeline, settings.data
    pipeline = PipelineSettings(
        chunk_size=pipe.chunk_size,
        n_workers=n_workers if n_workers is not None else pipe.n_workers,
        batch_size=pipe.batch_size,
        normalize=pipe.normalize,
        n_plot_examples=pipe.n_plot_examples,
        use_cache=use_cache,
        clear_cache=clear_cache,
        seed=data.seed,
        split_fractions=tuple(data.split_fractions),  # type: ignore[arg-type]
        elements=list(data.elements) or None,
        include_stellar_parameters=data.include_stellar_parameters,
        catalog_rules=CatalogRules.from_config(cfg["data"]),
        progress=progress,
    )
    fdir = ws.resolve(fits_dir if fits_dir is not None else ws.fits_dir)
    odir = ws.resolve(output_dir if output_dir is not None else ws.processed_dir)
    with FolderLock(odir, command):
        manifest = run_preprocess(
            fits_dir=fdir,
            output_dir=odir,
            reference_csv=ws.resolve(reference_csv) if reference_csv is not None else None,
            prediction_csv=ws.resolve(prediction_csv) if prediction_csv is not None else None,
            options=settings.preprocess_options(),
            settings=pipeline,
            plots_dir=ws.plots_path if plots else None,
        )
        save_config(cfg, odir / RESOLVED_CONFIG)
    return odir, manifest
