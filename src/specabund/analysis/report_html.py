"""One self-contained HTML page (``results/report.html``) with the key metrics and plots of every stage.

Images are embedded as base64 PNG and tables as HTML, so the file can be mailed or archived alone. A
stage that has not run gets a short "not run yet" note naming the command that produces it.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from .. import __version__
from ..utils import atomic_write_text
from .show import StageResults, collect_results

logger = logging.getLogger(__name__)

__all__ = ["build_report", "write_report"]

MAX_IMAGES_PER_SECTION = 12
MAX_TABLE_ROWS = 30

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #446; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eef; } td.t { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; color: #555; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
.omitted { color: #955; font-style: italic; }
"""


def _img(path: Path, caption: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = html.escape(caption or path.name)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
    )


def _table(df: pd.DataFrame | None, max_rows: int = MAX_TABLE_ROWS) -> str:
    if df is None or not len(df):
        return ""
    df = df.drop(columns=[c for c in ("recorded_at",) if c in df.columns])
    note = ""
    if len(df) > max_rows:
        note = f"<p>(first {max_rows} of {len(df)} rows)</p>"
        df = df.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for v in rec:
            if isinstance(v, float):
                cells.append(f"<td>{v:.4g}</td>")
            elif isinstance(v, (int,)) and not isinstance(v, bool):
                cells.append(f"<td>{v}</td>")
            else:
                cells.append(f'<td class="t">{html.escape(str(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{note}"


def _pre(text: str | None) -> str:
    return f"<pre>{html.escape(text)}</pre>" if text else ""


def _images(paths: Sequence[Path], budget: list[int]) -> str:
    out = []
    for p in list(dict.fromkeys(paths))[:MAX_IMAGES_PER_SECTION]:
        if p.suffix.lower() == ".png" and p.is_file():
            out.append(_img(p, str(p.name)))
            budget[0] += 1
    return "".join(out)


def _pngs(files: Sequence[Path]) -> list[Path]:
    return [p for p in files if p.suffix.lower() == ".png"]


def _batch_part(found: StageResults, key_patterns: Sequence[str], counter: list[int]) -> str:
    parts = []
    for b in found.batches:
        parts.append(f"<h3>{html.escape(b.name)} ({len(b.table)} batches)</h3>")
        parts.append(_pre(b.summary_text()))
        imgs = [
            p for p in b.plots if any(p.name.endswith(k) for k in key_patterns) and "batch_" not in p.name
        ]
        if b.trend_plot is not None:
            imgs.append(b.trend_plot)
        parts.append(_images(imgs, counter))
    return "".join(parts)


def build_report(results_dir: str | Path, plots_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """Build the HTML page from what exists under ``results_dir``.

    Returns
    -------
    html : str
        The page.
    info : dict
        ``included`` and ``omitted`` section names and ``n_images``.
    """
    results_dir = Path(results_dir)
    counter = [0]
    included: list[str] = []
    omitted: list[str] = []
    body: list[str] = []

    def section(title: str, found: StageResults, content: str) -> None:
        body.append(f"<h2>{html.escape(title)}</h2>")
        if found.empty or not content.strip():
            omitted.append(title)
            body.append(
                f'<p class="omitted">Not run yet: no results under {html.escape(str(found.results_dir))}. '
                f"Produce them with <code>{html.escape(found.command())}</code>.</p>"
            )
        else:
            included.append(title)
            body.append(content)

    # training
    tr = collect_results(results_dir, "training")
    extra: list[Path] = []
    if plots_dir is not None and Path(plots_dir).is_dir():
        extra = sorted(Path(plots_dir).rglob("*training_curves*.png"))[:4]
    if extra and tr.empty:
        from .show import Section

        tr.sections.append(Section("training plots", files=extra))
    content = _batch_part(tr, ("_training_curves.png", "_pred_vs_true.png"), counter)
    content += _images(extra if not tr.batches else [], counter)
    section("Training", tr, content)

    # evaluation
    ev = collect_results(results_dir, "evaluation")
    content = "".join(_table(s.table) + _images(_pngs(s.files), counter) for s in ev.sections)
    content += _batch_part(ev, (), counter)
    section("Evaluation (test set)", ev, content)

    # prediction
    pr = collect_results(results_dir, "prediction")
    content = "".join(_table(s.table) + _images(_pngs(s.files), counter) for s in pr.sections)
    content += _batch_part(pr, (), counter)
    section("Prediction", pr, content)

    # feature importance
    fi = collect_results(results_dir, "analysis", analysis_type="feature_importance")
    content = "".join(
        f"<h3>{html.escape(s.title)}</h3>" + _pre(s.text) + _images(_pngs(s.files), counter) + _table(s.table)
        for s in fi.sections
    )
    content += "".join(
        f"<h3>{html.escape(b.name)}: batch trends</h3>" + _images([b.trend_plot], counter)
        for b in fi.batches
        if b.trend_plot is not None
    )
    section("Feature importance", fi, content)

    # residual analysis
    ra = collect_results(results_dir, "analysis", analysis_type="residual_analysis")
    content = "".join(_table(s.table) + _images(_pngs(s.files), counter) for s in ra.sections)
    section("Residual analysis", ra, content)

    # baseline
    bl = collect_results(results_dir, "baseline")
    content = "".join(_table(s.table) + _images(_pngs(s.files), counter) for s in bl.sections)
    content += "".join(
        f"<h3>{html.escape(b.name)}</h3>" + _images([b.trend_plot], counter)
        for b in bl.batches
        if b.trend_plot is not None
    )
    section("Baselines and model comparison", bl, content)

    # tuning
    tu = collect_results(results_dir, "tuning")
    content = "".join(
        _pre(s.text) + _table(s.table, 15) + _images(_pngs(s.files), counter) for s in tu.sections
    )
    section("Hyperparameter tuning", tu, content)

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    summary = "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in included) + "</ul>"
    missing = (
        "<p class='omitted'>Not run yet (sections omitted): " + html.escape(", ".join(omitted)) + "</p>"
        if omitted
        else ""
    )
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>specabund report</title><style>{_CSS}</style></head><body>"
        f"<h1>specabund report</h1><p>Results folder: {html.escape(str(results_dir))}; generated {now} "
        f"by specabund {html.escape(__version__)}.</p><p>Sections with results:</p>{summary}{missing}"
        + "".join(body)
        + "</body></html>\n"
    )
    return page, {"included": included, "omitted": omitted, "n_images": counter[0]}


def write_report(
    results_dir: str | Path, output: str | Path | None = None, plots_dir: str | Path | None = None
) -> dict[str, Any]:
    """Write :func:`build_report` to ``output`` (default ``results_dir/report.html``) atomically.

    Returns the ``info`` dictionary of :func:`build_report` plus ``path``.
    """
    results_dir = Path(results_dir)
    out = Path(output) if output is not None else results_dir / "report.html"
    page, info = build_report(results_dir, plots_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    logger.info("report written to %s (%d images)", out, info["n_images"])
    return {**info, "path": out}
