"""``specabund analyze``, ``specabund show-results`` and ``specabund report``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from ..workflows import ANALYSIS_TYPES
from . import main, setup_logging
from .options import config_option, elements_option

log = logging.getLogger("specabund.cli")

for _name in ("analyze", "show-results", "report"):
    main.commands.pop(_name, None)  # replace the "not built yet" stubs


@main.command("analyze")
@elements_option("Labels to analyse (default: every abundance the model predicts).")
@click.option(
    "--type",
    "analysis_type",
    type=click.Choice(ANALYSIS_TYPES),
    default="both",
    show_default=True,
    help="Feature importance (integrated gradients + occlusion), residual analysis, or both.",
)
@click.option(
    "--analysis-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Spectra per analysis batch [config analysis.analysis_batch_size].",
)
@click.option(
    "--save-batch-results",
    is_flag=True,
    help="Write per-batch plots, reports and batch_tracking.csv "
    "(an interrupted run continues at the next batch).",
)
@click.option("--model", "model_run", default=None, help="Model run under models/ (default: the newest).")
@click.option(
    "--data-path",
    type=click.Path(path_type=Path),  # an .npz file or a .zarr store (a folder)
    default=None,
    help="Dataset to analyse [processed_data/test_dataset.npz].",
)
@click.option(
    "--max-spectra",
    type=click.IntRange(min=0),
    default=None,
    help="Analyse at most this many spectra, 0 = all [config analysis.max_spectra].",
)
@click.option(
    "--top-n", type=click.IntRange(min=1), default=None, help="Regions listed [analysis.top_n_regions]."
)
@click.option("--ig-steps", type=click.IntRange(min=1), default=None, help="Integrated-gradients steps.")
@click.option("--device", default=None, help="cpu, cuda or auto [config training.device].")
@config_option()
@click.pass_context
def analyze_cmd(
    ctx: click.Context,
    elements: tuple[str, ...],
    analysis_type: str,
    analysis_batch_size: int | None,
    save_batch_results: bool,
    model_run: str | None,
    data_path: Path | None,
    max_spectra: int | None,
    top_n: int | None,
    ig_steps: int | None,
    device: str | None,
    config_file: str | None,
) -> None:
    """Which wavelengths drive each prediction, and how the residuals behave.

    \b
    Examples:
      specabund analyze --elements MG_FE CA_FE --type feature_importance
      specabund analyze --elements C_FE --type both --save-batch-results --analysis-batch-size 32
      specabund analyze --model run_20261129-101500 --data-path processed_data/test_dataset.npz

    \b
    Outputs: results/feature_importance/<label>_{feature_importance.png,top_regions.csv,explanation.txt}
             results/residual_analysis/<label>_{residual_analysis.png,residual_report.txt,predictions.csv}
             and with --save-batch-results the <label>_batch_results/ folders.
    """
    from ..config import load_config
    from ..training import resolve_device
    from ..workflows import plan_analysis, run_analysis

    ws = ctx.obj["ws"]
    log_file = setup_logging(ws, "analyze", ctx.obj["verbose"], config_file)
    cfg = load_config(
        config_file,
        {
            "analysis.analysis_batch_size": analysis_batch_size,
            "analysis.max_spectra": max_spectra,
            "analysis.top_n_regions": top_n,
            "analysis.ig_steps": ig_steps,
            "training.device": device,
        },
    )
    dev = str(resolve_device(cfg["training"]["device"]))
    plan = plan_analysis(
        ws, cfg, dev, elements=elements, analysis_type=analysis_type, model=model_run, data_path=data_path
    )
    click.echo(
        f"model {plan.run_dir.name} on {dev}; data {plan.data_path} ({len(plan.dataset)} spectra); "
        f"labels {', '.join(plan.labels)}"
    )

    def show(kind: str, lab: str, res: Any) -> None:
        if res is None:
            click.echo(f"{lab}: no true values in {plan.data_path.name}; residual analysis skipped")
            return
        s = res.summary
        if kind == "feature_importance":
            click.echo(
                f"{lab} feature importance ({s['n_spectra']} spectra): own-line fraction "
                f"{s['own_fraction']:.1%} ({s['enrichment']:.2f}x chance); "
                f"IG completeness {s['ig_relative_delta']:.1e}"
            )
            click.echo(f"  {s['verdict']}")
        else:
            click.echo(
                f"{lab} residuals (n={s['n']}): RMSE {s['rmse']:.4g}, MAE {s['mae']:.4g}, bias "
                f"{s['bias']:+.3g}, robust scatter {s['robust_scatter']:.4g}, R2 {s['r2']:.3f}"
            )
        if res.batches_skipped:
            click.echo(f"  resumed: batches {res.batches_skipped} were already done")
        for role in ("plot", "regions", "explanation", "report", "predictions", "batch_folder"):
            if role in res.files:
                click.echo(f"  {role}: {res.files[role]}")

    run_analysis(plan, save_batch_results=save_batch_results, on_result=show, command="specabund analyze")
    click.echo(f"log: {log_file}")


@main.command("show-results")
@elements_option("Labels to show (default: all found).")
@click.option(
    "--result-type",
    type=click.Choice(["training", "evaluation", "prediction", "analysis", "tuning", "baseline"]),
    required=True,
    help="Which stage's results to show.",
)
@click.option(
    "--analysis-type",
    type=click.Choice(["feature_importance", "residual_analysis"]),
    default=None,
    help="With --result-type analysis: only this analysis (default both).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@config_option()
@click.pass_context
def show_results_cmd(
    ctx: click.Context,
    elements: tuple[str, ...],
    result_type: str,
    analysis_type: str | None,
    fmt: str,
    config_file: str | None,
) -> None:
    """Print the batch results of any stage: metrics per batch, trends and where the plots are.

    \b
    Examples:
      specabund show-results --result-type training --elements C_FE
      specabund show-results --result-type analysis --analysis-type residual_analysis
      specabund show-results --result-type baseline --format json
    """
    from ..analysis.show import collect_results, render_json, render_text
    from ..config import load_config
    from ..elements import normalize_label

    cfg = load_config(config_file)
    results = ctx.obj["ws"].with_paths(cfg["paths"]).results_path
    labels = [normalize_label(e) for e in elements] or None
    found = collect_results(results, result_type, labels, analysis_type)
    if fmt == "json":
        click.echo(json.dumps(render_json(found), indent=2))
    else:
        click.echo(render_text(found))


@main.command("report")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML file to write [results/report.html].",
)
@config_option()
@click.pass_context
def report_cmd(ctx: click.Context, output: Path | None, config_file: str | None) -> None:
    """Write one self-contained HTML page with the key metrics and plots of every stage that has run.

    \b
    Example:
      specabund report        # -> results/report.html
    """
    from ..analysis.report_html import write_report
    from ..config import load_config

    ws = ctx.obj["ws"]
    setup_logging(ws, "report", ctx.obj["verbose"], config_file)
    cfg = load_config(config_file)
    ws = ws.with_paths(cfg["paths"])
    results = ws.results_path
    out = ws.resolve(output) if output is not None else results / "report.html"
    info = write_report(results, out, plots_dir=ws.plots_path)
    click.echo(f"wrote {out} ({info['n_images']} images)")
    click.echo(f"  sections: {', '.join(info['included']) or 'none'}")
    if info["omitted"]:
        click.echo(f"  not run yet: {', '.join(info['omitted'])}")
