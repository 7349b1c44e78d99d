"""``specabund train``, ``specabund test`` and ``specabund all``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, SpecabundError
from . import bounded_workers, lock_output, main, setup_logging
from .options import config_option, elements_option, resolve_in_workdir

log = logging.getLogger("specabund.cli")

for _name in ("train", "test", "all"):
    main.commands.pop(_name, None)


# --------------------------------------------------------------------------------------------- helpers


def load_training_data(data_path: Path) -> tuple[Any, Any, Any | None]:
    """(train, val, test-or-None) from a reference dataset (split by its ``split`` column) or a train file
    with ``val_dataset.npz`` (and ``test_dataset.npz``) beside it."""
    from ..dataset import SPLIT_CODES, load_dataset

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


def choose_labels(requested: tuple[str, ...], available: list[str], include_params: bool) -> list[str]:
    """Requested abundances (default all), then Teff, logg and [Fe/H] when present and wanted."""
    from ..elements import STELLAR_PARAMETERS, resolve_labels

    # every abundance by default; a dataset without any (e.g. a LASP catalogue) learns its parameters
    abund = [a for a in available if a not in STELLAR_PARAMETERS] or list(available)
    labels = resolve_labels(requested or None, available if requested else abund, what="dataset labels")
    if include_params:
        labels += [p for p in STELLAR_PARAMETERS if p in available and p not in labels]
    return labels


def build_configs(cfg: dict[str, Any], device: str) -> tuple[Any, Any, int]:
    """ModelConfig, TrainConfig and ensemble size from the resolved configuration."""
    from ..models.registry import default_config
    from ..training.trainer import TrainConfig

    m = dict(cfg["model"])
    name = m.pop("name", "rescnn")
    model_cfg = default_config(name, **m)
    t = dict(cfg["training"])
    ensemble = int(t.pop("ensemble", 1))
    t["device"] = device
    if not t.get("num_threads"):
        t["num_threads"] = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    elif isinstance(t["num_threads"], int) and not isinstance(t["num_threads"], bool):
        t["num_threads"] = bounded_workers(t["num_threads"], "training.num_threads")
    try:
        train_cfg = TrainConfig.from_dict(t)
    except TypeError as exc:
        raise ConfigError(f"[training]: {exc}") from exc
    return model_cfg, train_cfg, ensemble


def _run_name(labels: list[str]) -> str:
    from ..workspace import timestamp

    abund = [lab for lab in labels if lab.endswith("_FE")] or labels
    return f"{'_'.join(abund[:4])}{'_etc' if len(abund) > 4 else ''}_{timestamp()}"


def tracking_name(labels: list[str]) -> str:
    """Name used for the per-element result folders (``training_<name>_batch_results``)."""
    abund = [lab for lab in labels if lab.endswith("_FE")] or labels
    return "_".join(abund)


# --------------------------------------------------------------------------------------------- train


#: What ``train`` was asked for, kept in the run folder so that ``--resume RUN`` alone continues it.
TRAIN_ARGS_FILE = "train_args.json"
RESOLVED_CONFIG = "resolved_config.toml"


def _run_config(run_dir: Path | None, config_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration; on resume the run's own ``resolved_config.toml`` replaces the defaults
    (then ``--config``, then the flags), so a resumed run is configured like its first attempt."""
    from ..config import default_config, dotted_to_nested, load_config, merge, read_toml, validate

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


def _read_train_args(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / TRAIN_ARGS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecabundError(f"{path}: cannot read the arguments of the interrupted run ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _check_fresh_run_dir(run_dir: Path) -> None:
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


def _train(
    ctx: click.Context,
    data_path: Path,
    elements: tuple[str, ...],
    overrides: dict[str, Any],
    config_file: str | None,
    resume: str | None,
    run_name: str | None,
    overwrite: bool = False,
    data_path_given: bool = True,
    init_from: str | None = None,
) -> Path:
    from ..config import save_config
    from ..runs import resolve_resumable
    from ..training.trainer import resolve_device, train, train_ensemble
    from ..utils import atomic_write_json

    ws = ctx.obj["ws"]
    run_dir: Path | None = None
    stored: dict[str, Any] = {}
    if resume:
        run_dir = resolve_resumable(ws.models(), resume)
        stored = _read_train_args(run_dir)
        if not data_path_given and stored.get("data_path"):
            data_path = Path(stored["data_path"])
        if not elements and stored.get("elements"):
            elements = tuple(str(e) for e in stored["elements"])
    elif run_name is not None:
        if not run_name.strip() or Path(run_name).name != run_name or run_name in (".", ".."):
            raise SpecabundError(f"--run-name {run_name!r} must be a plain folder name (no path separators)")
        run_dir = ws.models() / run_name
        if not overwrite:
            _check_fresh_run_dir(run_dir)
    cfg = _run_config(run_dir if resume else None, config_file, overrides)
    device = str(resolve_device(cfg["training"]["device"]))
    data_path = ws.resolve(data_path)
    tr, va, _ = load_training_data(data_path)
    labels = choose_labels(elements, tr.elements, cfg["data"]["include_stellar_parameters"])
    model_cfg, train_cfg, ensemble = build_configs(cfg, device)
    if run_dir is None:
        run_dir = ws.models() / _run_name(labels)
        if not overwrite:
            _check_fresh_run_dir(run_dir)
    from ..training import distributed

    run_dir = distributed.same_on_all_ranks(run_dir)  # torchrun: rank 0's (time-stamped) folder
    if distributed.is_primary():
        lock_output(ctx, run_dir)
    if not resume and not overwrite:
        _check_fresh_run_dir(run_dir)  # again, now that no one else can write it
    name = tracking_name(labels)
    plot_dir = ws.results(f"training_{name}_batch_results")
    log.info(
        "training %s on %d spectra (val %d), labels %s, device %s",
        model_cfg.name,
        len(tr),
        len(va),
        labels,
        device,
    )
    extra = {"training_data": str(data_path)}
    manifest = data_path.with_name("manifest.json")
    if manifest.exists():
        import json

        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if m.get("preprocess_hash") == tr.preprocess_hash:
                extra["preprocess_options"] = {**m["options"], "normalize": m["settings"]["normalize"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "%s: unreadable (%s); the model will not carry the preprocessing options", manifest, exc
            )
    args = {
        "data_path": str(data_path),
        "elements": list(elements),
        "labels": labels,
        "config_file": str(config_file) if config_file else None,
        "ensemble": ensemble,
    }
    recorded = {"done": False}

    def record_run(epoch: int, row: dict[str, Any]) -> bool:
        # the resolved configuration and the request are written with the first checkpoint, never before
        if not recorded["done"]:
            save_config(cfg, run_dir / RESOLVED_CONFIG)
            atomic_write_json(run_dir / TRAIN_ARGS_FILE, args)
            recorded["done"] = True
        return False

    parent = None
    if init_from:
        from ..runs import resolve_run

        parent = resolve_run(ws.models(), init_from)
        args["init_from"] = str(parent)
        if ensemble > 1:
            raise SpecabundError("--init-from fine-tunes a single model; drop --ensemble")
    elif resume and stored.get("init_from"):
        parent = Path(stored["init_from"])
    kw = dict(
        resume=bool(resume),
        plot_dir=plot_dir,
        progress=True,
        name=name,
        overwrite=overwrite,
        extra_config=extra,
        callbacks=[record_run],
    )
    if ensemble > 1:
        results = train_ensemble(tr, va, labels, model_cfg, train_cfg, run_dir, ensemble, **kw)
    else:
        results = [train(tr, va, labels, model_cfg, train_cfg, run_dir, init_from=parent, **kw)]
    if not distributed.is_primary():
        return run_dir  # rank 0 writes and reports
    if not (run_dir / RESOLVED_CONFIG).exists():
        save_config(cfg, run_dir / RESOLVED_CONFIG)
    for k, res in enumerate(results):
        who = f"member {k}" if ensemble > 1 else "model"
        click.echo(
            f"{who}: best epoch {res.best_epoch} of {res.epochs_run}, val loss {res.best_val_loss:.4f}"
        )
        for lab, m in res.final_metrics.items():
            click.echo(
                f"  {lab:>8}: RMSE {m['rmse']:.4g}  robust scatter {m['robust_scatter']:.4g}  "
                f"bias {m['bias']:+.3g}"
            )
    click.echo(f"saved model: {run_dir}")
    click.echo(f"training plots: {plot_dir}")
    return run_dir


_train_options = [
    click.option(
        "--data-path",
        type=click.Path(dir_okay=False, path_type=Path),
        callback=resolve_in_workdir,
        default=Path("processed_data/reference_dataset.npz"),
        show_default=True,
        help="Reference dataset (split by its split column) or train_dataset.npz with val beside it.",
    ),
    elements_option(
        "Labels to predict (default: every abundance); Teff, logg, [Fe/H] are added when present."
    ),
    click.option("--batch-size", type=click.IntRange(min=2), default=None),
    click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None),
    click.option("--epochs", type=click.IntRange(min=1), default=None),
    click.option(
        "--early-stopping", type=click.IntRange(min=0), default=None, help="Patience in epochs (0: off)."
    ),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None),
    click.option("--seed", type=int, default=None),
    click.option(
        "--ensemble", type=click.IntRange(min=1), default=None, help="Train N members with seeds seed+k."
    ),
    click.option(
        "--model-name", default=None, help="Registered architecture (rescnn, rescnn_small, rescnn_wide)."
    ),
    click.option("--run-name", default=None, help="Folder name under models/ [labels + time stamp]."),
    click.option(
        "--overwrite", is_flag=True, help="Replace an existing run of the same name (from scratch)."
    ),
    config_option(),
]


def _apply(options: list[Any]) -> Any:
    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def _overrides(kw: dict[str, Any]) -> dict[str, Any]:
    return {
        "training.batch_size": kw.get("batch_size"),
        "training.learning_rate": kw.get("learning_rate"),
        "training.epochs": kw.get("epochs"),
        "training.early_stopping": kw.get("early_stopping"),
        "training.device": kw.get("device"),
        "training.seed": kw.get("seed"),
        "training.ensemble": kw.get("ensemble"),
        "model.name": kw.get("model_name"),
    }


@main.command("train")
@_apply(_train_options)
@click.option(
    "--resume",
    default=None,
    help="Continue the run RUN (name under models/ or path) from its last checkpoint, with its own "
    "configuration, data and labels (flags given now override them).",
)
@click.option(
    "--init-from",
    default=None,
    help="Fine-tune from the trained run RUN (name under models/ or path), e.g. a model trained on "
    "simulated spectra: its architecture and matching weights, a new output layer for other labels, "
    "the label standardisation refitted on the new data.",
)
@click.option(
    "--freeze-epochs",
    type=click.IntRange(min=0),
    default=None,
    help="With --init-from: train only the head for the first N epochs [config training.freeze_epochs].",
)
@click.pass_context
def train_cmd(ctx: click.Context, **kw: Any) -> None:
    """Train the SpectralResCNN on preprocessed spectra.

    \b
    Examples:
      specabund train --data-path processed_data/reference_dataset.npz --elements C_FE MG_FE
      specabund train --elements C_FE,MG_FE --epochs 50 --ensemble 5
      specabund train --resume C_FE_MG_FE_20261129-101500
      specabund train --elements TEFF LOGG FE_H --init-from sim_model --freeze-epochs 5
    """
    setup_logging(ctx.obj["ws"], "train", ctx.obj["verbose"])
    if kw["freeze_epochs"] and not kw["init_from"]:
        raise click.UsageError("--freeze-epochs needs --init-from RUN")
    overrides = _overrides(kw)
    overrides["training.freeze_epochs"] = kw["freeze_epochs"]
    if kw["resume"] and kw["overwrite"]:
        raise click.UsageError("--resume continues a run, --overwrite replaces it: give one of them")
    given = ctx.get_parameter_source("data_path") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )
    _train(
        ctx,
        kw["data_path"],
        kw["elements"],
        overrides,
        kw["config_file"],
        kw["resume"],
        kw["run_name"],
        kw["overwrite"],
        data_path_given=given,
        init_from=kw["init_from"],
    )


# --------------------------------------------------------------------------------------------- test


def _test(
    ctx: click.Context,
    data_path: Path,
    model: str | None,
    elements: tuple[str, ...],
    truth: Path | None,
    isochrones: Path | None,
    config_file: str | None,
    device: str | None,
) -> dict[str, Any]:
    from ..config import load_config, save_config
    from ..dataset import load_dataset
    from ..elements import resolve_labels
    from ..runs import resolve_run
    from ..training.evaluate import evaluate
    from ..training.saved import load_model
    from ..training.trainer import resolve_device

    ws = ctx.obj["ws"]
    cfg = load_config(config_file, {"training.device": device})
    run_dir = resolve_run(ws.models(), model)
    dev = resolve_device(cfg["training"]["device"])
    loaded = load_model(run_dir, dev)
    ds = load_dataset(ws.resolve(data_path))
    if (ds.split == 2).any() and (ds.split != 2).any():
        ds = ds.split_subset("test")
    labels = resolve_labels(elements or None, loaded.labels, what=f"labels of model {run_dir.name}")
    out = lock_output(ctx, ws.results("evaluation"))
    ev = cfg["evaluation"]
    res = evaluate(
        loaded, ds, labels, out, snr_bins=ev["snr_bins"], logg_split=ev["logg_split"], isochrones=isochrones
    )
    save_config(cfg, out / "resolved_config.toml")
    _evaluation_batches(ws, loaded, ds, labels, out)
    _cnn_comparison_rows(ws, out, labels, ev["snr_bins"])
    click.echo(f"evaluated model {run_dir.name} on {len(ds)} spectra -> {out}")
    for lab in labels:
        m = res["metrics"][lab]["all"]
        click.echo(
            f"  {lab:>8}: n {m['n']}  RMSE {m['rmse']:.4g}  MAE {m['mae']:.4g}  robust scatter "
            f"{m['robust_scatter']:.4g}  bias {m['bias']:+.3g}  R2 {m['r2']:.3f}"
        )
    if truth is not None:
        _information_limit(ws.resolve(truth), ds, out, labels, ev["snr_bins"])
    return res


def _evaluation_batches(ws: Any, loaded: Any, ds: Any, labels: list[str], out: Path) -> None:
    """Per-batch metrics rows in results/evaluation_<element>_batch_results/ (from evaluation predictions)."""
    import numpy as np
    import pandas as pd

    from ..metrics import regression_metrics
    from ..tracking import BatchTracker

    pred = pd.read_csv(out / "predictions.csv")
    batch = 1000
    for lab in labels:
        tracker = BatchTracker(ws.results(f"evaluation_{lab}_batch_results"), lab)
        for k, start in enumerate(range(0, len(pred), batch), start=1):
            part = pred.iloc[start : start + batch]
            m = regression_metrics(part[f"{lab}_true"].to_numpy(), part[f"{lab}_pred"].to_numpy())
            m["median_err"] = float(np.nanmedian(part[f"{lab}_err"])) if len(part) else float("nan")
            tracker.record(k, m)
        tracker.finalize(["rmse", "robust_scatter", "bias", "r2", "median_err"])


def _cnn_comparison_rows(ws: Any, out: Path, labels: list[str], snr_bins: list[float]) -> None:
    """Add the CNN to results/baseline/comparison.csv (same test split as the baselines)."""
    try:
        from ..baselines.comparison import update_comparison
    except ImportError:
        return
    import pandas as pd

    from ..metrics import metrics_by_snr

    pred = pd.read_csv(out / "predictions.csv")
    rows = []
    for lab in labels:
        if not lab.endswith("_FE"):
            continue
        by = metrics_by_snr(pred[f"{lab}_true"], pred[f"{lab}_pred"], pred["snr"], snr_bins)
        for bin_name, m in by.items():
            rows.append(
                {
                    "model": "cnn",
                    "element": lab,
                    "snr_bin": bin_name,
                    **{k: m[k] for k in ("n", "rmse", "robust_scatter", "bias", "r2")},
                }
            )
    if rows:
        from ..baselines.comparison import labels_only_verdicts

        table = update_comparison(ws.root / "results", rows)
        for _, v in labels_only_verdicts(table[table["model"] == "cnn"]).iterrows():
            if v["verdict"]:
                click.echo(
                    f"  {v['element']:>8}: RMSE {v['rmse']:.4g} = {v['rmse_ratio_labels_only']:.2f} x the "
                    f"labels-only baseline ({v['rmse_labels_only']:.4g}): {v['verdict']}"
                )


def _information_limit(truth: Path, ds: Any, out: Path, labels: list[str], snr_bins: list[float]) -> None:
    import pandas as pd

    from ..evaluation.crb import cramer_rao_bounds, information_limit_table, load_truth
    from ..utils import atomic_write

    pred = pd.read_csv(out / "predictions.csv")
    t = load_truth(truth, ds)
    bounds = cramer_rao_bounds(t, ds.ivar, ds.wavelength, labels)
    y_true = pred[[f"{lab}_true" for lab in labels]].to_numpy()
    y_pred = pred[[f"{lab}_pred" for lab in labels]].to_numpy()
    table = information_limit_table(y_true, y_pred, bounds, ds.snr, labels, snr_bins)
    with atomic_write(out / "information_limit.csv", "w", encoding="utf-8", newline="") as fh:
        table.to_csv(fh, index=False)
    click.echo("information limit (Cramer-Rao bound from the simulator, marginalised over all labels):")
    click.echo(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


_test_options = [
    click.option(
        "--data-path",
        type=click.Path(dir_okay=False, path_type=Path),
        callback=resolve_in_workdir,
        default=Path("processed_data/test_dataset.npz"),
        show_default=True,
    ),
    click.option("--model", default=None, help="Run name under models/ or a path [newest run]."),
    elements_option("Labels to evaluate [all the model predicts]."),
    click.option(
        "--truth",
        type=click.Path(dir_okay=False, path_type=Path),
        callback=resolve_in_workdir,
        default=None,
        help="Simulator truth.csv: also report RMSE against the Cramer-Rao bound.",
    ),
    click.option(
        "--isochrones",
        type=click.Path(dir_okay=False, path_type=Path),
        callback=resolve_in_workdir,
        default=None,
        help="MIST .iso file drawn on the Kiel diagrams.",
    ),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None),
    config_option(),
]


@main.command("test")
@_apply(_test_options)
@click.pass_context
def test_cmd(ctx: click.Context, **kw: Any) -> None:
    """Evaluate a trained model: metrics overall, per SNR bin and dwarfs vs giants, with plots.

    \b
    Examples:
      specabund test --data-path processed_data/test_dataset.npz
      specabund test --model C_FE_MG_FE_20261129-101500 --elements C_FE --truth sim/truth.csv
    """
    setup_logging(ctx.obj["ws"], "evaluation", ctx.obj["verbose"])
    _test(
        ctx,
        kw["data_path"],
        kw["model"],
        kw["elements"],
        kw["truth"],
        kw["isochrones"],
        kw["config_file"],
        kw["device"],
    )


# --------------------------------------------------------------------------------------------- all


@main.command("all")
@_apply(_train_options)
@click.option(
    "--tuned/--no-tuned",
    default=True,
    show_default=True,
    help="Overlay results/hyperopt/best_params.toml when it exists (written by 'specabund tune').",
)
@click.option(
    "--truth", type=click.Path(dir_okay=False, path_type=Path), callback=resolve_in_workdir, default=None
)
@click.pass_context
def all_cmd(ctx: click.Context, **kw: Any) -> None:
    """Train (with tuned parameters when 'specabund tune' has run), then test on the test split.

    \b
    Example:
      specabund all --data-path processed_data/reference_dataset.npz --elements C_FE MG_FE
    """
    ws = ctx.obj["ws"]
    setup_logging(ws, "train", ctx.obj["verbose"])
    config_file = kw["config_file"]
    tuned = ws.root / "results" / "hyperopt" / "best_params.toml"
    if kw["tuned"] and config_file is None and tuned.exists():
        click.echo(f"using tuned parameters {tuned}")
        config_file = str(tuned)
    run_dir = _train(
        ctx,
        kw["data_path"],
        kw["elements"],
        _overrides(kw),
        config_file,
        None,
        kw["run_name"],
        kw["overwrite"],
    )
    data_path = ws.resolve(kw["data_path"])
    test_path = (
        data_path if data_path.name == "reference_dataset.npz" else data_path.with_name("test_dataset.npz")
    )
    _test(ctx, test_path, str(run_dir), (), kw["truth"], None, config_file, kw["device"])
