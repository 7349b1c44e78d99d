"""``specabund tune``: resumable batch hyperparameter optimisation with optuna."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..config import load_config, save_config
from ..errors import SpecabundError
from . import lock_output, main, setup_logging
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

    from ..config import parse_settings
    from ..training import resolve_device
    from ..tuning import SearchSpace, open_study, run_tuning, write_report
    from ..tuning.storage import resolve_storage
    from ..workflows import choose_labels, load_training_data

    ws = ctx.obj["ws"]
    log_file = setup_logging(ws, "tune", ctx.obj["verbose"])
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
    settings = parse_settings(cfg)
    ws = ws.with_paths(cfg["paths"])
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
    if desc.startswith("sqlite:"):
        # SQLite serves one process: a second tune into the same results is refused (journal and RDB
        # storages are meant to be shared by several workers)
        lock_output(ctx, out_dir)

    if report_only:
        study, desc = open_study(options, out_dir)
        if not study.get_trials(deepcopy=False):
            raise SpecabundError(
                f"study {options.study_name!r} in {desc} has no trials; run `specabund tune` first"
            )
        summary = write_report(study, out_dir, space=space, storage=desc, seed=options.seed)
    else:
        # the same data split and label choice as `specabund train`
        given = ctx.get_parameter_source("data_path") not in (
            click.core.ParameterSource.DEFAULT,
            click.core.ParameterSource.DEFAULT_MAP,
        )
        path = ws.resolve(data_path) if given else ws.dataset_path("reference")
        train_ds, val_ds, _ = load_training_data(path)
        requested = tuple(elements) or tuple(settings.data.elements)
        labels = choose_labels(requested, list(train_ds.elements), settings.data.include_stellar_parameters)
        device = str(resolve_device(settings.training.device))
        base_model = settings.model_config()
        base_train = settings.train_config(device)
        logger.info(
            "tuning %s on %d training / %d validation spectra (%s), study %r in %s; log %s",
            ",".join(labels),
            len(train_ds),
            len(val_ds),
            device,
            options.study_name,
            desc,
            log_file,
        )
        result = run_tuning(train_ds, val_ds, labels, space, base_model, base_train, options, out_dir)
        summary = write_report(
            result.study,
            out_dir,
            space=space,
            model_name=base_model.name,
            storage=result.storage,
            seed=options.seed,
        )
        logger.info("this process finished trials %s; the study holds %d", result.ran, result.n_done)
    save_config(cfg, out_dir / "resolved_config.toml")
    click.echo((out_dir / "summary.txt").read_text(encoding="utf-8"), nl=False)
    if summary.get("best"):
        click.echo(f"best: {out_dir / 'best_params.toml'}\nrobust: {out_dir / 'robust_params.toml'}")
