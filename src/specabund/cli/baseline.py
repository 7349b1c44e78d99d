"""``specabund baseline``: XGBoost, LightGBM and a Cannon-style model on the same splits as the CNN."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ..errors import SpecabundError
from . import bounded_workers, lock_output, main, setup_logging
from .options import MultiValueOption, config_option, resolve_in_workdir

log = logging.getLogger("specabund.cli")

main.commands.pop("baseline", None)


@main.command("baseline")
@click.option(
    "--element",
    "elements",
    cls=MultiValueOption,
    help="Label(s) to model, e.g. --element C_FE (or C_FE MG_FE); [every abundance].",
)
@click.option(
    "--model",
    "model_name",
    type=click.Choice(["xgboost", "lightgbm", "cannon", "labels_only", "both", "all"]),
    default="both",
    show_default=True,
    help="'both' = XGBoost + LightGBM; 'all' adds the Cannon and labels_only (LightGBM on the catalogue's "
    "Teff, logg, [Fe/H] alone, no spectrum: what the correlations give).",
)
@click.option(
    "--data-path",
    type=click.Path(path_type=Path),  # an .npz file or a .zarr store (a folder)
    default=Path("processed_data/reference_dataset.npz"),
    show_default=True,
    callback=resolve_in_workdir,
    help="Reference dataset with its train/val/test split.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=0), default=None, help="Training spectra per batch (0: all)."
)
@click.option("--batches-per-round", type=click.IntRange(min=1), default=None)
@click.option(
    "--show-batch-results", is_flag=True, help="Print the per-batch results of earlier runs and exit."
)
@click.option(
    "--n-threads", type=click.IntRange(min=0), default=None, help="Threads for the tree models (0: all)."
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--seed", type=int, default=None)
@click.option(
    "--cannon-order",
    type=click.IntRange(1, 4),
    default=None,
    help="Polynomial order of the Cannon models [config: 3].",
)
@click.option(
    "--cannon-regions",
    type=click.IntRange(min=0),
    default=None,
    help="Cannon models per region of Teff/logg/[Fe/H] (0: one per 400 training spectra, max 8; "
    "1: one global model) [config: 0].",
)
@config_option()
@click.pass_context
def baseline_cmd(
    ctx: click.Context,
    elements: tuple[str, ...],
    model_name: str,
    data_path: Path,
    batch_size: int | None,
    batches_per_round: int | None,
    show_batch_results: bool,
    n_threads: int | None,
    device: str | None,
    seed: int | None,
    cannon_order: int | None,
    cannon_regions: int | None,
    config_file: Path | None,
) -> None:
    """Baselines on the same train/val/test split as the CNN, compared in results/baseline/.

    \b
    Examples:
      specabund baseline --element C_FE --model xgboost
      specabund baseline --element C_FE --model both --batch-size 1000 --batches-per-round 2
      specabund baseline --element C_FE --model both --show-batch-results
      specabund baseline --element MG_FE --model all
      specabund baseline --element MG_FE --model cannon --cannon-order 2 --cannon-regions 1
    """
    from ..baselines.runner import run_baseline
    from ..baselines.runner import show_batch_results as batch_table
    from ..config import load_config, parse_settings, save_config
    from ..dataset import load_dataset
    from ..elements import STELLAR_PARAMETERS, resolve_labels

    ws = ctx.obj["ws"]
    setup_logging(ws, "baseline", ctx.obj["verbose"], config_file)
    results_root = ws.results()
    if show_batch_results:
        if not elements:
            raise click.UsageError("--show-batch-results needs --element")
        for el in elements:
            from ..elements import normalize_label

            lab = normalize_label(el)
            df = batch_table(results_root, lab, model_name)
            if len(df) == 0:
                click.echo(
                    f"{lab}: no baseline batch results for model '{model_name}' yet; run 'specabund baseline'"
                )
                continue
            cols = [c for c in df.columns if c not in ("recorded_at",)]
            click.echo(f"== {lab} ({model_name})")
            click.echo(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        return
    cfg = load_config(
        config_file,
        {
            "baseline.batch_size": batch_size,
            "baseline.batches_per_round": batches_per_round,
            "baseline.n_threads": n_threads,
            "baseline.device": device,
            "data.seed": seed,
            "baseline.cannon_order": cannon_order,
            "baseline.cannon_regions": cannon_regions,
        },
    )
    b = cfg["baseline"]
    cannon = parse_settings(cfg).cannon_settings()
    ws = ws.with_paths(cfg["paths"])
    results_root = ws.results()
    ds = load_dataset(data_path)
    if not ((ds.split == 0).any() and (ds.split == 1).any() and (ds.split == 2).any()):
        raise SpecabundError(
            f"{data_path}: needs train, validation and test rows (the reference_dataset.npz of "
            "'specabund preprocess')"
        )
    available = [e for e in ds.elements if e not in STELLAR_PARAMETERS] or list(ds.elements)
    labels = resolve_labels(
        elements or None, ds.elements if elements else available, what=f"{data_path.name}"
    )
    lock_output(ctx, ws.result_dir("baseline"))  # comparison.csv is shared by every baseline run
    if b["n_threads"]:
        b["n_threads"] = bounded_workers(b["n_threads"], "--n-threads")
    snr_bins = tuple(cfg["evaluation"]["snr_bins"])
    for lab in labels:
        res: dict[str, Any] = run_baseline(
            ds,
            lab,
            model_name,
            results_root,
            batch_size=b["batch_size"] or None,
            batches_per_round=b["batches_per_round"],
            n_threads=b["n_threads"] or None,
            device=b["device"],
            seed=cfg["data"]["seed"],
            snr_bins=snr_bins,
            cannon=cannon,
        )
        for model, r in res.items():
            t = r["test"]["all"]
            click.echo(
                f"{lab} {model:>9}: batches {r['batches_done']}/{r['n_batches']}  test RMSE {t['rmse']:.4g}  "
                f"robust scatter {t['robust_scatter']:.4g}  bias {t['bias']:+.3g}  R2 {t['r2']:.3f}"
            )
    save_config(cfg, ws.result_dir("baseline") / "resolved_config.toml")
    click.echo(f"comparison: {ws.result_dir('baseline') / 'comparison.csv'}")
    from ..baselines.comparison import labels_only_verdicts, read_comparison

    for _, v in labels_only_verdicts(read_comparison(results_root)).iterrows():
        if v["verdict"] and v["element"] in labels:
            click.echo(
                f"{v['element']} {v['model']:>9}: RMSE {v['rmse_ratio_labels_only']:.2f} x labels-only: "
                f"{v['verdict']}"
            )
