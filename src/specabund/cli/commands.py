"""Subcommands of ``specabund`` (each a thin layer over library functions)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..distributed import cluster_option, dask_client
from . import bounded_workers, lock_output, main, setup_logging
from .options import config_option, elements_option, resolve_in_workdir

log = logging.getLogger("specabund.cli")


@main.command("simulate")
@click.option(
    "--n", "n", type=click.IntRange(min=1), default=2000, show_default=True, help="Number of spectra."
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("simulated"),
    show_default=True,
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--layout",
    type=click.Choice(["mixed", "table", "image"]),
    default="mixed",
    show_default=True,
    help="FITS layout: DR9+ binary table, DR2-DR8 5xN image, or a mix.",
)
@click.option("--gzip", is_flag=True, help="Write .fits.gz files.")
@click.option(
    "--independent", is_flag=True, help="Draw every label independently (no Galactic correlations)."
)
@click.option(
    "--permuted",
    is_flag=True,
    help="Galactic stars with each [X/Fe] shuffled across them: the same distributions, no correlation "
    "with Teff/logg/[Fe/H] (the independent-abundance check of a trained model).",
)
@click.option("--prediction-fraction", type=click.FloatRange(0, 0.9), default=0.2, show_default=True)
@click.option("--n-workers", type=click.IntRange(min=1), default=1, show_default=True)
@cluster_option("each chunk of 500 files")
@click.pass_context
def simulate_cmd(
    ctx: click.Context,
    n: int,
    output_dir: Path,
    seed: int,
    layout: str,
    gzip: bool,
    independent: bool,
    permuted: bool,
    prediction_fraction: float,
    n_workers: int,
    cluster: str | None,
) -> None:
    """Write simulated LAMOST spectra (FITS) with X_FE.csv, galah_X_FE.csv and truth.csv.

    \b
    Example:
      specabund simulate --n 2000 --output-dir demo --seed 1
    """
    from ..simulate import simulate_dataset

    if independent and permuted:
        raise click.UsageError("--independent and --permuted exclude each other")
    ws = ctx.obj["ws"]
    setup_logging(ws, "simulate", ctx.obj["verbose"])
    out = lock_output(ctx, ws.resolve(output_dir))
    with dask_client(cluster, bounded_workers(n_workers)) as client:
        summary = simulate_dataset(
            n,
            out,
            seed,
            layout=layout,
            gzip=gzip,
            independent=independent,
            permuted=permuted,
            prediction_fraction=prediction_fraction,
            n_workers=bounded_workers(n_workers),
            client=client,
        )
    click.echo(f"wrote {n} simulated spectra to {out / 'fits'}")
    for k, v in summary.items():
        if not isinstance(v, (dict, list)):
            click.echo(f"  {k}: {v}")


@main.command("preprocess")
@click.option(
    "--reference-csv",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=resolve_in_workdir,
    help="Reference catalogue (X_FE.csv): preprocessed and split 7:1:2 into train/val/test.",
)
@click.option(
    "--prediction-csv",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=resolve_in_workdir,
    help="Prediction catalogue (galah_X_FE.csv): only preprocessed.",
)
@click.option(
    "--fits-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of FITS files (searched recursively) [config paths.fits_dir].",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [config paths.processed_dir].",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Files handed to a worker at once."
)
@click.option(
    "--chunk-size", type=click.IntRange(min=1), default=None, help="Spectra per checkpointed chunk."
)
@click.option("--n-workers", type=click.IntRange(min=1), default=None, help="Parallel worker processes.")
@cluster_option("each chunk of --chunk-size spectra")
@click.option(
    "--format",
    "dataset_format",
    type=click.Choice(["auto", "npz", "zarr"]),
    default="auto",
    show_default=True,
    help="Dataset format: npz (one file, loaded whole), zarr (<set>_dataset.zarr: chunked, compressed, "
    "read lazily, for survey-size sets) or auto (zarr when flux+ivar of a set exceed 1 GB).",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor leave a cache (fresh run).")
@click.option("--clear-cache", is_flag=True, help="Delete the preprocessing cache before running.")
@click.option("--denoise/--no-denoise", default=None, help="Edge-preserving denoising [off].")
@click.option("--normalize/--no-normalize", default=None, help="Continuum normalisation [on].")
@click.option("--seed", type=int, default=None, help="Seed of the train/val/test split.")
@click.option(
    "--plots/--no-plots",
    default=True,
    show_default=True,
    help="Stage-by-stage plots of a few spectra and distributions in plots/preprocessing/.",
)
@click.option(
    "--flag-policy",
    type=click.Choice(["mask", "keep"]),
    default=None,
    help="Catalogue quality flags (MG_FE_FLAG, flag_mg_fe, flag_sp, ASPCAPFLAG STAR_BAD): 'mask' turns "
    "flagged labels into NaN, 'keep' keeps them [config data.flag_policy: mask].",
)
@elements_option(
    "Labels to keep: any label of the reference catalogue (MG_FE, MG_H, M_H, ALPHA_M, TEFF, LOGG, FE_H) or "
    "any numeric column (default: every *_FE, *_H, *_M column, else teff, logg, fe_h)."
)
@config_option()
@click.pass_context
def preprocess_cmd(
    ctx: click.Context,
    reference_csv: Path | None,
    prediction_csv: Path | None,
    fits_dir: Path | None,
    output_dir: Path | None,
    batch_size: int | None,
    chunk_size: int | None,
    n_workers: int | None,
    cluster: str | None,
    dataset_format: str,
    no_cache: bool,
    clear_cache: bool,
    denoise: bool | None,
    normalize: bool | None,
    seed: int | None,
    plots: bool,
    flag_policy: str | None,
    elements: tuple[str, ...],
    config_file: str | None,
) -> None:
    """Preprocess raw LAMOST FITS files into training-ready datasets.

    \b
    Examples:
      specabund preprocess --reference-csv X_FE.csv --fits-dir fits --output-dir processed_data
      specabund preprocess --prediction-csv galah_X_FE.csv --fits-dir fits
      specabund preprocess --reference-csv X_FE.csv --prediction-csv galah_X_FE.csv --n-workers 2
      specabund preprocess --reference-csv lasp_labels.csv --fits-dir fits --elements TEFF LOGG FE_H
    """
    from ..config import load_config
    from ..workflows import preprocess_run

    ws = ctx.obj["ws"]
    log_file = setup_logging(ws, "preprocess", ctx.obj["verbose"], config_file)
    if reference_csv is None and prediction_csv is None:
        raise click.UsageError("give --reference-csv, --prediction-csv or both")
    cfg = load_config(
        config_file,
        {
            "preprocess.batch_size": batch_size,
            "preprocess.chunk_size": chunk_size,
            "preprocess.n_workers": n_workers,
            "preprocess.denoise": denoise,
            "preprocess.normalize": normalize,
            "data.seed": seed,
            "data.elements": list(elements) if elements else None,
            "data.flag_policy": flag_policy,
        },
    )
    n_proc = bounded_workers(cfg["preprocess"]["n_workers"])
    with dask_client(cluster, n_proc) as client:
        odir, manifest = preprocess_run(
            ws,
            cfg,
            reference_csv=reference_csv,
            prediction_csv=prediction_csv,
            fits_dir=fits_dir,
            output_dir=output_dir,
            n_workers=n_proc,
            use_cache=not no_cache,
            clear_cache=clear_cache,
            plots=plots,
            progress=True,
            command="specabund preprocess",
            dataset_format=dataset_format,
            client=client,
        )
    click.echo(f"preprocessed into {odir} (labels: {', '.join(manifest['labels']) or 'none'})")
    for name, c in manifest["counts"].items():
        click.echo(f"  {name}: {c}")
    click.echo(
        f"  rejected: {manifest['rejected_total']} {manifest['rejected_by_reason']} (see rejected.csv)"
    )
    click.echo(f"  log: {log_file}")
