"""``specabund train``, ``specabund test`` and ``specabund all``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from . import bounded_workers, main, setup_logging
from .options import config_option, elements_option, resolve_in_workdir

log = logging.getLogger("specabund.cli")

for _name in ("train", "test", "all"):
    main.commands.pop(_name, None)


# --------------------------------------------------------------------------------------------- helpers


def _default_threads() -> int:
    """Every CPU this process may use (``training.num_threads = 0``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads(cfg: dict[str, Any]) -> int:
    n = cfg["training"].get("num_threads")
    return bounded_workers(n, "training.num_threads") if n else _default_threads()


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )


# --------------------------------------------------------------------------------------------- train


def _train(
    ctx: click.Context,
    data_path: Path | None,
    elements: tuple[str, ...],
    overrides: dict[str, Any],
    config_file: str | None,
    resume: str | None,
    run_name: str | None,
    overwrite: bool = False,
    init_from: str | None = None,
) -> Path:
    from ..training.trainer import resolve_device
    from ..workflows import plan_training, run_training

    plan = plan_training(
        ctx.obj["ws"],
        data_path,
        elements,
        config_file=config_file,
        overrides=overrides,
        resume=resume,
        run_name=run_name,
        overwrite=overwrite,
        init_from=init_from,
    )
    device = str(resolve_device(plan.device_request))
    outcome = run_training(plan, device, num_threads=_threads(plan.cfg), progress=True, command=_command(ctx))
    from ..training import distributed

    if not distributed.is_primary():
        return outcome.run_dir  # torchrun: rank 0 reports
    ensemble = len(outcome.results) > 1
    for k, res in enumerate(outcome.results):
        who = f"member {k}" if ensemble else "model"
        click.echo(
            f"{who}: best epoch {res.best_epoch} of {res.epochs_run}, val loss {res.best_val_loss:.4f}"
        )
        for lab, m in res.final_metrics.items():
            click.echo(
                f"  {lab:>8}: RMSE {m['rmse']:.4g}  robust scatter {m['robust_scatter']:.4g}  "
                f"bias {m['bias']:+.3g}"
            )
    click.echo(f"saved model: {outcome.run_dir}")
    click.echo(f"training plots: {outcome.plot_dir}")
    return outcome.run_dir


def _command(ctx: click.Context) -> str:
    return f"specabund {ctx.info_name or ''}".strip()


_train_options = [
    click.option(
        "--data-path",
        type=click.Path(path_type=Path),  # an .npz file or a .zarr store (a folder)
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
    setup_logging(ctx.obj["ws"], "train", ctx.obj["verbose"], kw["config_file"])
    if kw["freeze_epochs"] and not kw["init_from"]:
        raise click.UsageError("--freeze-epochs needs --init-from RUN")
    overrides = _overrides(kw)
    overrides["training.freeze_epochs"] = kw["freeze_epochs"]
    if kw["resume"] and kw["overwrite"]:
        raise click.UsageError("--resume continues a run, --overwrite replaces it: give one of them")
    _train(
        ctx,
        kw["data_path"] if _given(ctx, "data_path") else None,
        kw["elements"],
        overrides,
        kw["config_file"],
        kw["resume"],
        kw["run_name"],
        kw["overwrite"],
        init_from=kw["init_from"],
    )


# --------------------------------------------------------------------------------------------- test


def _test(
    ctx: click.Context,
    data_path: Path | None,
    model: str | None,
    elements: tuple[str, ...],
    truth: Path | None,
    isochrones: Path | None,
    config_file: str | None,
    device: str | None,
) -> dict[str, Any]:
    from ..config import load_config
    from ..training.trainer import resolve_device
    from ..workflows import evaluate_run

    cfg = load_config(config_file, {"training.device": device})
    dev = str(resolve_device(cfg["training"]["device"]))
    out = evaluate_run(
        ctx.obj["ws"],
        cfg,
        dev,
        data_path=data_path,
        model=model,
        elements=elements,
        truth=truth,
        isochrones=isochrones,
        command=_command(ctx),
    )
    click.echo(f"evaluated model {out.run_dir.name} on {out.n_spectra} spectra -> {out.out_dir}")
    for lab in out.labels:
        m = out.result["metrics"][lab]["all"]
        click.echo(
            f"  {lab:>8}: n {m['n']}  RMSE {m['rmse']:.4g}  MAE {m['mae']:.4g}  robust scatter "
            f"{m['robust_scatter']:.4g}  bias {m['bias']:+.3g}  R2 {m['r2']:.3f}"
        )
    if out.verdicts is not None:
        for _, v in out.verdicts.iterrows():
            click.echo(
                f"  {v['element']:>8}: RMSE {v['rmse']:.4g} = {v['rmse_ratio_labels_only']:.2f} x the "
                f"labels-only baseline ({v['rmse_labels_only']:.4g}): {v['verdict']}"
            )
    if out.information_limit is not None:
        click.echo("information limit (Cramer-Rao bound from the simulator, marginalised over all labels):")
        click.echo(out.information_limit.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return out.result


_test_options = [
    click.option(
        "--data-path",
        type=click.Path(path_type=Path),  # an .npz file or a .zarr store (a folder)
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
    setup_logging(ctx.obj["ws"], "evaluation", ctx.obj["verbose"], kw["config_file"])
    _test(
        ctx,
        kw["data_path"] if _given(ctx, "data_path") else None,
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
    from ..config import load_config

    ws = ctx.obj["ws"]
    setup_logging(ws, "train", ctx.obj["verbose"], kw["config_file"])
    config_file = kw["config_file"]
    tuned = ws.with_paths(load_config(config_file)["paths"]).tuned_params()
    if kw["tuned"] and config_file is None and tuned.exists():
        click.echo(f"using tuned parameters {tuned}")
        config_file = str(tuned)
    given = _given(ctx, "data_path")
    run_dir = _train(
        ctx,
        kw["data_path"] if given else None,
        kw["elements"],
        _overrides(kw),
        config_file,
        None,
        kw["run_name"],
        kw["overwrite"],
    )
    from ..workflows import read_train_args

    data_path = Path(read_train_args(run_dir).get("data_path") or ws.resolve(kw["data_path"]))
    test_path = (
        data_path if data_path.name == "reference_dataset.npz" else data_path.with_name("test_dataset.npz")
    )
    _test(ctx, test_path, str(run_dir), (), kw["truth"], None, config_file, kw["device"])
