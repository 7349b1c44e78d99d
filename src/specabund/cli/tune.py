"""``specabund tune``: resumable batch hyperparameter optimisation with optuna."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..config import load_config
from . import main, setup_logging
from .options import config_option, elements_option

logger = logging.getLogger(__name__)

main.commands.pop("tune", None)

TUNE_EPILOG = """\b
Storage (--storage, relative paths under --workdir):
  (default)                     sqlite results/hyperopt/<study-name>.db, one process at a time
  results/hyperopt/NAME.db      that SQLite file
  results/hyperopt/NAME.log     journal file (optuna JournalStorage): several processes at once
  postgresql://user@host/db     an RDB server (any SQLAlchemy URL): several machines
\b
--n-trials is the study's total: rerunning the same command resumes an interrupted study and runs only
the missing trials; start the same command in several terminals (journal or RDB storage) to share it.
\b
Outputs in results/hyperopt/: trials.csv, optimization_history.png, intermediate_values.png,
parallel_coordinate.png, param_importance.png, best_params.toml, robust_params.toml (overlays for
`specabund train --config`), summary.txt, summary.json, resolved_config.toml.
\b
Example:
  specabund tune --data-path processed_data/reference_dataset.npz --elements C_FE \\
      --n-trials 50 --storage results/hyperopt/c_fe.log --study-name c_fe
"""


@main.command("tune", epilog=TUNE_EPILOG)
@click.option(
    "--data-path",
    type=click.Path(path_type=Path),
    default=Path("processed_data/reference_dataset.npz"),
    show_default=True,
    help="Reference dataset (train/val split column), or a train file with val_dataset.npz beside it.",
)
@elements_option()
@config_option()
@click.option("--n-trials", type=click.IntRange(min=1), help="Total trials of the study [tuning.n_trials].")
@click.option("--method", type=click.Choice(["tpe", "grid", "random"]), help="Sampler [tuning.method].")
@click.option(
    "--batch-size-hyperopt",
    type=click.IntRange(min=2),
    help="Spectra per batch [tuning.batch_size_hyperopt].",
)
@click.option(
    "--batches-per-round", type=click.IntRange(min=1), help="Batches per round [tuning.batches_per_round]."
)
@click.option(
    "--epochs-per-trial", type=click.IntRange(min=1), help="Epochs per trial [tuning.epochs_per_trial]."
)
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="Seconds before no new trial starts [tuning.timeout]."
)
@click.option("--storage", help="Study storage: .db file, .log journal file or RDB URL [tuning.storage].")
@click.option("--study-name", help="Study name [tuning.study_name].")
@click.option(
    "--pruner", type=click.Choice(["median", "percentile", "hyperband", "none"]), help="[tuning.pruner]"
)
@click.option(
    "--worker-id",
    type=int,
    default=None,
    help="Makes this worker's sampler reproducible (give each concurrent worker its own).",
)
@click.option("--report-only", is_flag=True, help="Only rewrite the report of the existing study.")
@click.pass_context
def tune_cmd(
    ctx: click.Context,
    data_path: Path,
    elements: tuple[str, ...],
    config_file: str | None,
    n_trials: int | None,
    method: str | None,
    batch_size_hyperopt: int | None,
    batches_per_round: int | None,
    epochs_per_trial: int | None,
    timeout: float | None,
    storage: str | None,
    study_name: str | None,
    pruner: str | None,
    worker_id: int | None,
    report_only: bool,
) -> None:
    """Tune learning rate, batch size, network widths/depths, kernels, dropout, weight decay and augmentation.

    Each trial trains on the round's fresh batches of training spectra for --epochs-per-trial epochs and
    is scored by its validation loss; poor trials are pruned epoch by epoch. Writes best_params.toml
    (lowest validation loss) and robust_params.toml (smallest model within one standard error of the best).
    """
    import optuna

    from ..training import resolve_device
    from ..workflows import tune_run

    ws = ctx.obj["ws"]
    log_file = setup_logging(ws, "tune", ctx.obj["verbose"], config_file)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    cfg = load_config(
        config_file,
        {
            "tuning.n_trials": n_trials,
            "tuning.method": method,
            "tuning.batch_size_hyperopt": batch_size_hyperopt,
            "tuning.batches_per_round": batches_per_round,
            "tuning.epochs_per_trial": epochs_per_trial,
            "tuning.timeout": timeout,
            "tuning.storage": storage,
            "tuning.study_name": study_name,
            "tuning.pruner": pruner,
        },
    )
    given = ctx.get_parameter_source("data_path") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )
    device = None if report_only else str(resolve_device(cfg["training"]["device"]))
    logger.info("tune log: %s", log_file)
    outcome = tune_run(
        ws,
        cfg,
        device,
        data_path=data_path if given else None,
        elements=elements,
        worker_id=worker_id,
        report_only=report_only,
        command="specabund tune",
    )
    out_dir = outcome.out_dir
    click.echo((out_dir / "summary.txt").read_text(encoding="utf-8"), nl=False)
    if outcome.summary.get("best"):
        click.echo(f"best: {out_dir / 'best_params.toml'}\nrobust: {out_dir / 'robust_params.toml'}")
