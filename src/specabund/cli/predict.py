"""``specabund predict``: labels with calibrated uncertainties for preprocessed or raw spectra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..distributed import cluster_option, dask_client
from . import bounded_workers, main, setup_logging
from .options import config_option, elements_option

main.commands.pop("predict", None)

_PATH = click.Path(path_type=Path)


@main.command("predict")
@click.option(
    "--data-path", type=_PATH, default=None, help="Preprocessed dataset (.npz, or a .zarr store) to predict."
)
@click.option("--fits-dir", type=click.Path(file_okay=False, path_type=Path), help="Raw FITS folder.")
@click.option("--files", "files", default=None, help="Raw FITS files: a glob, or a text file listing paths.")
@click.option("--catalog", type=_PATH, default=None, help="CSV naming the spectra (spec, rv, group, labels).")
@click.option("--model", "model_name", default=None, help="Run name under models/ or a path [newest].")
@click.option("--output-dir", type=_PATH, default=None, help="Output folder [results/predictions].")
@elements_option("Labels to report (default: every label of the model).")
@click.option("--ensemble-mode", is_flag=True, help="Combine the members of an ensemble run.")
@click.option("--mc-samples", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Spectra per forward pass (64 is fastest on a 2-core CPU).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the MC-Dropout masks.")
@click.option("--calibrate", is_flag=True, help="Fit the uncertainty calibration on --data-path (val set).")
@click.option("--train-data", type=_PATH, default=None, help="Training set for the OOD reference [beside].")
@click.option("--test-data", type=_PATH, default=None, help="Held-out set for coverage [beside].")
@click.option(
    "--calibration-method", type=click.Choice(["coverage", "mad"]), default="coverage", show_default=True
)
@click.option(
    "--label-error",
    "label_errors",
    multiple=True,
    metavar="LABEL=VALUE",
    help="With --calibrate: typical error of the validation labels where the catalogue gives none "
    "(e.g. TEFF=100 for a survey pipeline's Teff); subtracted so the uncertainty is the model's own.",
)
@click.option("--no-calibration", is_flag=True, help="Do not apply a stored calibration.")
@click.option(
    "--preprocess-config", type=_PATH, default=None, help="manifest.json of the model's training data."
)
@click.option("--n-workers", type=click.IntRange(min=1), default=1, show_default=True)
@cluster_option("each part of --chunk-size spectra of --data-path")
@click.option("--chunk-size", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@config_option()
@click.pass_context
def predict_cmd(
    ctx: click.Context,
    data_path: Path | None,
    fits_dir: Path | None,
    files: str | None,
    catalog: Path | None,
    model_name: str | None,
    output_dir: Path | None,
    elements: tuple[str, ...],
    ensemble_mode: bool,
    mc_samples: int,
    batch_size: int,
    device: str,
    seed: int,
    calibrate: bool,
    train_data: Path | None,
    test_data: Path | None,
    calibration_method: str,
    label_errors: tuple[str, ...],
    no_calibration: bool,
    preprocess_config: Path | None,
    n_workers: int,
    cluster: str | None,
    chunk_size: int,
    no_plots: bool,
    config_file: str | None,
) -> None:
    """Predict labels with MC-Dropout/ensemble uncertainties, calibration and OOD flags.

    \b
    Examples:
      specabund predict --data-path processed_data/prediction_dataset.npz --elements C_FE MG_FE
      specabund predict --fits-dir fits/ --model RUN --output-dir results/predictions
      specabund predict --files 'fits/**/*.fits.gz' --catalog galah_X_FE.csv --ensemble-mode
      specabund predict --calibrate --data-path processed_data/val_dataset.npz --model RUN
    """
    from ..config import load_config
    from ..training import resolve_device
    from ..workflows import calibrate_run, predict_run

    ws = ctx.obj["ws"]
    log_file = setup_logging(ws, "predict", ctx.obj["verbose"], config_file)
    cfg = load_config(config_file, {})
    n_sources = sum(x is not None for x in (data_path, fits_dir, files))
    if n_sources > 1:
        raise click.UsageError("give only one of --data-path, --fits-dir and --files")
    if calibrate and (fits_dir is not None or files is not None):
        raise click.UsageError("--calibrate needs --data-path (the validation dataset)")
    if cluster and (calibrate or fits_dir is not None or files is not None):
        raise click.UsageError("--cluster predicts a preprocessed --data-path (preprocess with --cluster)")
    n_workers = bounded_workers(n_workers)
    dev = str(resolve_device(device))
    common: dict[str, Any] = dict(
        model=model_name,
        output_dir=output_dir,
        labels=list(elements) or None,
        ensemble_mode=ensemble_mode,
        mc_samples=mc_samples,
        batch_size=batch_size,
        seed=seed,
        plots=not no_plots,
        command="specabund predict",
    )

    if label_errors and not calibrate:
        raise click.UsageError("--label-error is for --calibrate")
    assumed = _label_errors(label_errors)
    if calibrate:
        res = calibrate_run(
            ws,
            cfg,
            dev,
            data_path=data_path,
            train_data=train_data,
            test_data=test_data,
            method=calibration_method,
            label_errors=assumed or None,
            **common,
        )
        report = res.summary
        click.echo(f"calibrated {res.run_dir} ({report['mode']} mode) on {res.input}")
        for lab, e in report["labels"].items():
            line = f"  {lab}: scale {e['scale']:.3f}; val 68% coverage {e['val_before']['coverage_68']:.3f}"
            line += f" -> {e['val_after']['coverage_68']:.3f}"
            if "test_after" in e:
                line += (
                    f"; test {e['test_before']['coverage_68']:.3f} -> {e['test_after']['coverage_68']:.3f}"
                    f" (95%: {e['test_before']['coverage_95']:.3f} -> {e['test_after']['coverage_95']:.3f})"
                )
            click.echo(line)
        click.echo(f"  report: {res.out_dir / 'calibration_report.json'}; log: {log_file}")
        return

    from .progress import SpectraProgress

    bars: list[SpectraProgress] = []

    def progress(total: int) -> Any:
        bars.append(SpectraProgress(total, "predict"))  # spectra, spectra/s, ETA
        return bars[-1].update

    with dask_client(cluster, n_workers) as client:
        res = predict_run(
            ws,
            cfg,
            dev,
            data_path=data_path,
            fits_dir=fits_dir,
            files=files,
            catalog=catalog,
            apply_calibration=not no_calibration,
            preprocess_config=preprocess_config,
            n_workers=n_workers,
            chunk_size=chunk_size,
            client=client,
            progress=progress,
            **common,
        )
    for bar in bars:
        bar.close()
    summary = res.summary
    if "parts" in summary:  # a .zarr store or --cluster: the catalogue was written in parts
        click.echo(
            f"predicted {summary['n_predicted']} of {summary['n_input']} spectra in {len(summary['parts'])} "
            f"parts -> {res.out_dir / 'predictions.csv'}; flagged: {summary['n_flagged']} "
            f"{summary['flag_counts']}"
        )
        click.echo(f"  log: {log_file}")
        return
    click.echo(
        f"predicted {summary['n_predicted']} of {summary['n_input']} spectra "
        f"({', '.join(summary['labels'])}) -> {res.out_dir / 'predictions.csv'}"
    )
    click.echo(
        f"  flagged: {summary['n_flagged']} {summary['flag_counts']}; calibrated: {summary['calibrated']}"
    )
    if "repeats" in summary:
        click.echo(f"  repeat pairs: {summary['repeats']['n_pairs']} (see repeats.json)")
    click.echo(f"  log: {log_file}")


def _label_errors(items: tuple[str, ...]) -> dict[str, float]:
    """``('TEFF=100', 'logg=0.15')`` -> ``{'TEFF': 100.0, 'LOGG': 0.15}`` (labels normalised)."""
    from ..elements import normalize_label

    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not name.strip() or not (number > 0 and number < float("inf")):
            raise click.BadParameter(
                f"{item!r}: expected LABEL=VALUE with a positive VALUE", param_hint="--label-error"
            )
        out[normalize_label(name.strip())] = number
    return out
