"""``specabund predict``: labels with calibrated uncertainties for preprocessed or raw spectra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from . import bounded_workers, lock_output, main, setup_logging
from .options import config_option, elements_option

main.commands.pop("predict", None)

_PATH = click.Path(path_type=Path)


@main.command("predict")
@click.option("--data-path", type=_PATH, default=None, help="Preprocessed dataset (.npz) to predict.")
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
@click.option("--no-calibration", is_flag=True, help="Do not apply a stored calibration.")
@click.option(
    "--preprocess-config", type=_PATH, default=None, help="manifest.json of the model's training data."
)
@click.option("--n-workers", type=click.IntRange(min=1), default=1, show_default=True)
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
    no_calibration: bool,
    preprocess_config: Path | None,
    n_workers: int,
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
    from ..config import dumps, load_config, save_config
    from ..dataset import load_dataset
    from ..plotting import save_figure
    from ..predict import (
        PredictionInputs,
        collect_files,
        read_prediction_catalog,
        resolve_preprocess,
        run_prediction,
    )
    from ..predict import (
        calibrate as calibrate_fn,
    )
    from ..predict.plots import z_histogram_figure
    from ..runs import resolve_run
    from ..training import load_model, resolve_device
    from ..utils import atomic_write_json, ensure_dir

    ws = ctx.obj["ws"]
    log_file = setup_logging(ws, "predict", ctx.obj["verbose"])
    cfg = load_config(config_file, {})
    n_sources = sum(x is not None for x in (data_path, fits_dir, files))
    if n_sources > 1:
        raise click.UsageError("give only one of --data-path, --fits-dir and --files")
    if calibrate and (fits_dir is not None or files is not None):
        raise click.UsageError("--calibrate needs --data-path (the validation dataset)")
    n_workers = bounded_workers(n_workers)
    processed = ws.resolve(cfg["paths"]["processed_dir"])
    run_dir = resolve_run(ws.resolve(cfg["paths"]["models_dir"]), model_name)
    dev = resolve_device(device)
    predictor = load_model(run_dir, dev)
    out = ensure_dir(ws.resolve(output_dir) if output_dir is not None else ws.results("predictions"))
    lock_output(ctx, out)
    labels = list(elements) or None
    settings: dict[str, Any] = {
        "model": str(run_dir),
        "device": str(dev),
        "mc_samples": mc_samples,
        "batch_size": batch_size,
        "seed": seed,
        "ensemble_mode": ensemble_mode,
    }

    if calibrate:
        lock_output(ctx, run_dir)  # the calibration is stored with the model
        val_path = ws.resolve(data_path or processed / "val_dataset.npz")
        tr = ws.resolve(train_data) if train_data else val_path.parent / "train_dataset.npz"
        te = ws.resolve(test_data) if test_data else val_path.parent / "test_dataset.npz"
        res = calibrate_fn(
            predictor,
            load_dataset(val_path),
            train_dataset=load_dataset(tr) if tr.exists() else None,
            test_dataset=load_dataset(te) if te.exists() else None,
            labels=labels,
            ensemble_mode=ensemble_mode,
            n_samples=mc_samples,
            batch_size=batch_size,
            seed=seed,
            method=calibration_method,
        )
        report = {**res.report, "val_data": str(val_path), "settings": settings}
        report["train_data"] = str(tr) if tr.exists() else None
        report["test_data"] = str(te) if te.exists() else None
        atomic_write_json(out / "calibration_report.json", report)
        if not no_plots and res.z_val is not None:
            fig = z_histogram_figure(res.labels, res.z_val, res.scale, res.z_test)
            save_figure(fig, out / "calibration_z_histograms.png")
        save_config(cfg, out / "resolved_config.toml")
        click.echo(f"calibrated {run_dir} ({report['mode']} mode) on {val_path}")
        for lab, e in res.report["labels"].items():
            line = f"  {lab}: scale {e['scale']:.3f}; val 68% coverage {e['val_before']['coverage_68']:.3f}"
            line += f" -> {e['val_after']['coverage_68']:.3f}"
            if "test_after" in e:
                line += (
                    f"; test {e['test_before']['coverage_68']:.3f} -> {e['test_after']['coverage_68']:.3f}"
                    f" (95%: {e['test_before']['coverage_95']:.3f} -> {e['test_after']['coverage_95']:.3f})"
                )
            click.echo(line)
        click.echo(f"  report: {out / 'calibration_report.json'}; log: {log_file}")
        return

    if fits_dir is not None or files is not None:
        paths, root = collect_files(ws.resolve(fits_dir) if fits_dir else None, files)
        opts, normalize, source = resolve_preprocess(
            predictor,
            ws.resolve(preprocess_config) if preprocess_config else None,
            [processed / "manifest.json"],
        )
        cat = read_prediction_catalog(ws.resolve(catalog)) if catalog else None
        inputs = PredictionInputs.from_fits(
            paths, opts, normalize=normalize, catalog=cat, fits_dir=root, n_workers=n_workers
        )
        settings.update(input=str(fits_dir or files), preprocess_options_from=source)
    else:
        path = ws.resolve(data_path or processed / "prediction_dataset.npz")
        inputs = PredictionInputs.from_dataset(load_dataset(path))
        settings.update(input=str(path))
    from .progress import SpectraProgress

    progress = SpectraProgress(int(inputs.ok.sum()), "predict")  # spectra, spectra/s, ETA
    summary = run_prediction(
        predictor,
        inputs,
        out,
        labels=labels,
        ensemble_mode=ensemble_mode,
        n_samples=mc_samples,
        batch_size=batch_size,
        seed=seed,
        apply_calibration=not no_calibration,
        batch_root=ws.results(),
        chunk_size=chunk_size,
        plots=not no_plots,
        extra={"settings": settings},
        extra_files={"resolved_config.toml": "# resolved specabund configuration\n" + dumps(cfg)},
        progress=progress.update,
    )
    progress.close()
    click.echo(
        f"predicted {summary['n_predicted']} of {summary['n_input']} spectra "
        f"({', '.join(summary['labels'])}) -> {out / 'predictions.csv'}"
    )
    click.echo(
        f"  flagged: {summary['n_flagged']} {summary['flag_counts']}; calibrated: {summary['calibrated']}"
    )
    if "repeats" in summary:
        click.echo(f"  repeat pairs: {summary['repeats']['n_pairs']} (see repeats.json)")
    click.echo(f"  log: {log_file}")
