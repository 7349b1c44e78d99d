"""Reading the results of every stage for ``specabund show-results`` (and the HTML report).

Every stage that works in batches keeps a :class:`~specabund.tracking.BatchTracker` folder
(``batch_tracking.csv`` plus ``<name>_batch_trends.png`` and ``<name>_batch_summary.txt``), so one reader
serves all of them. The known places under the results folder are:

=============  ===================================================================================
training       ``training_<labels>_batch_results/`` (one row per epoch)
evaluation     ``evaluation/`` (metrics.csv, plots) and ``evaluation_<label>_batch_results/``
prediction     ``predictions/`` and ``prediction_<label>_batch_results/``
analysis       ``feature_importance/`` and ``residual_analysis/`` with ``<label>_batch_results/``
tuning         ``hyperopt/`` (:func:`specabund.tuning.tuning_summary`, else ``trials.csv``/``summary.txt``)
baseline       ``baseline/comparison.csv`` and ``baseline_<label>_<model>_batch_results/``
=============  ===================================================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import SpecabundError
from ..tracking import TRACKING_FILE, BatchTracker
from ..utils import to_jsonable
from ..workspace import batch_results_dir, find_batch_results, result_folder

__all__ = [
    "STAGES",
    "STAGE_COMMANDS",
    "BatchResults",
    "Section",
    "StageResults",
    "collect_results",
    "label_matches",
    "render_json",
    "render_text",
]

STAGES = ("training", "evaluation", "prediction", "analysis", "tuning", "baseline")

#: The command that produces each stage's results.
STAGE_COMMANDS: dict[str, str] = {
    "training": "specabund train --data-path processed_data/reference_dataset.npz --elements <LABELS>",
    "evaluation": "specabund test --data-path processed_data/test_dataset.npz",
    "prediction": "specabund predict --data-path processed_data/prediction_dataset.npz",
    "analysis": "specabund analyze --elements <LABELS> --type both --save-batch-results",
    "feature_importance": "specabund analyze --elements <LABELS> --type feature_importance",
    "residual_analysis": "specabund analyze --elements <LABELS> --type residual_analysis",
    "tuning": "specabund tune",
    "baseline": "specabund baseline --element <LABEL> --model both",
}

MAX_ROWS = 25
_LABEL_IN_NAME = re.compile(r"(^|_)([A-Z]{1,2}_FE|FE_H|TEFF|LOGG)(_|$)")


@dataclass
class BatchResults:
    """One BatchTracker folder.

    Attributes
    ----------
    name : str
        What the folder is about (``C_FE``, ``C_FE_xgboost``, ``feature_importance/C_FE``...).
    folder : Path
    table : DataFrame
        ``batch_tracking.csv`` sorted by batch.
    summary_file, trend_plot : Path or None
        ``<name>_batch_summary.txt`` and ``<name>_batch_trends.png`` when written.
    plots : list of Path
        Other images under the folder (per-batch plots).
    """

    name: str
    folder: Path
    table: pd.DataFrame
    summary_file: Path | None = None
    trend_plot: Path | None = None
    plots: list[Path] = field(default_factory=list)

    def summary_text(self) -> str:
        if self.summary_file is not None:
            return self.summary_file.read_text(encoding="utf-8")
        return BatchTracker(self.folder, self.name).summary_text()


@dataclass
class Section:
    """A non-batch result of a stage: a table and/or a text, with the files it came from."""

    title: str
    table: pd.DataFrame | None = None
    text: str | None = None
    files: list[Path] = field(default_factory=list)


@dataclass
class StageResults:
    """Everything found for one stage."""

    stage: str
    results_dir: Path
    labels: list[str] | None = None
    analysis_type: str | None = None
    batches: list[BatchResults] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.batches and not self.sections

    def command(self) -> str:
        key = self.analysis_type if self.stage == "analysis" and self.analysis_type else self.stage
        cmd = STAGE_COMMANDS[key]
        if self.labels:
            cmd = cmd.replace("<LABELS>", " ".join(self.labels)).replace("<LABEL>", self.labels[0])
        return cmd

    def no_results_message(self) -> str:
        what = (
            self.analysis_type.replace("_", " ")
            if self.stage == "analysis" and self.analysis_type
            else self.stage
        )
        for_labels = f" for {', '.join(self.labels)}" if self.labels else ""
        return (
            f"No {what} results yet{for_labels} under {self.results_dir} "
            f"(looked in: {', '.join(self.searched)}).\nProduce them with:\n  {self.command()}"
        )


def label_matches(name: str, labels: Sequence[str] | None) -> bool:
    """Whether a folder name part such as ``C_FE_MG_FE`` or ``C_FE_xgboost`` is about one of ``labels``.

    Matching is on whole underscore-separated label names, so ``C_FE`` does not match ``SC_FE``.
    """
    if not labels:
        return True
    wrapped = f"_{name.upper()}_"
    return any(f"_{lab.upper()}_" in wrapped for lab in labels)


def _read_batch_folder(folder: Path, name: str) -> BatchResults:
    table = BatchTracker(folder, name).table()
    summaries = sorted(folder.glob("*_batch_summary.txt"))
    trends = sorted(folder.glob("*_batch_trends.png"))
    plots = sorted(p for p in folder.rglob("*.png") if p not in trends)
    return BatchResults(
        name=name,
        folder=folder,
        table=table,
        summary_file=summaries[0] if summaries else None,
        trend_plot=trends[0] if trends else None,
        plots=plots,
    )


def _glob_batch(results_dir: Path, prefix: str, labels: Sequence[str] | None) -> list[BatchResults]:
    out = []
    for name, folder in find_batch_results(results_dir, prefix):
        if (folder / TRACKING_FILE).exists() and label_matches(name, labels):
            out.append(_read_batch_folder(folder, name))
    return out


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


def _filter_label_rows(df: pd.DataFrame, labels: Sequence[str] | None) -> pd.DataFrame:
    if not labels:
        return df
    for col in ("label", "element", "LABEL", "Element"):
        if col in df.columns:
            return df[df[col].astype(str).str.upper().isin([lab.upper() for lab in labels])]
    return df


def _files_section(title: str, folder: Path, labels: Sequence[str] | None) -> Section | None:
    if not folder.is_dir():
        return None
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in {".csv", ".png", ".txt", ".json"}
    )
    # keep files about the requested labels and files about no label in particular (metrics.csv, ...)
    files = [p for p in files if label_matches(p.stem, labels) or not _LABEL_IN_NAME.search(p.stem.upper())]
    table = None
    for cand in ("metrics.csv", "summary.csv"):
        if (folder / cand).exists():
            table = _read_csv(folder / cand)
            if table is not None:
                table = _filter_label_rows(table, labels)
            break
    if not files:
        return None
    return Section(title=title, table=table, files=files)


def _analysis(results_dir: Path, labels: Sequence[str] | None, analysis_type: str | None) -> StageResults:
    res = StageResults("analysis", results_dir, list(labels) if labels else None, analysis_type)
    kinds = [analysis_type] if analysis_type else ["feature_importance", "residual_analysis"]
    for kind in kinds:
        base = result_folder(results_dir, kind)
        res.searched.append(str(base))
        if not base.is_dir():
            continue
        for lab, folder in find_batch_results(base, None):
            if (folder / TRACKING_FILE).exists() and label_matches(lab, labels):
                res.batches.append(_read_batch_folder(folder, lab))
                res.batches[-1].name = f"{kind}/{lab}"
        if kind == "feature_importance":
            for js in sorted(base.glob("*_importance_summary.json")):
                lab = js.name[: -len("_importance_summary.json")]
                if not label_matches(lab, labels):
                    continue
                s = json.loads(js.read_text(encoding="utf-8"))
                regions = base / f"{lab}_top_regions.csv"
                table = _read_csv(regions) if regions.exists() else None
                text = (
                    f"{s.get('verdict', '')}\nown-line fraction {s.get('own_fraction', float('nan')):.1%} "
                    f"({s.get('enrichment', float('nan')):.2f}x chance), {s.get('n_spectra')} spectra, "
                    f"IG completeness {s.get('ig_relative_delta', float('nan')):.1e}"
                )
                cands = (base / f"{lab}_feature_importance.png", regions, base / f"{lab}_explanation.txt")
                files = [p for p in cands if p.exists()]
                res.sections.append(Section(f"feature importance: {lab}", table, text, files))
        else:
            rows = []
            files: list[Path] = []
            for js in sorted(base.glob("*_residual_summary.json")):
                lab = js.name[: -len("_residual_summary.json")]
                if not label_matches(lab, labels):
                    continue
                s = json.loads(js.read_text(encoding="utf-8"))
                rows.append(
                    {k: s.get(k) for k in ("label", "n", "rmse", "mae", "bias", "robust_scatter", "r2")}
                )
                cands = [
                    base / f"{lab}_{s}"
                    for s in ("residual_analysis.png", "residual_report.txt", "predictions.csv")
                ]
                files += [p for p in cands if p.exists()]
            if rows:
                res.sections.append(Section("residual analysis", pd.DataFrame(rows), None, files))
    return res


def _tuning(results_dir: Path) -> StageResults:
    res = StageResults("tuning", results_dir)
    folder = result_folder(results_dir, "tuning")
    res.searched.append(str(folder))
    summary: dict[str, Any] | None = None
    try:
        from .. import tuning as _tuning_mod

        fn = getattr(_tuning_mod, "tuning_summary", None)
        if fn is not None:
            summary = fn(results_dir)
    except SpecabundError:
        summary = None
    except ImportError:
        summary = None
    if summary is not None:
        trials = pd.DataFrame(summary.get("trials") or [])
        files = [folder / f for f in summary.get("files", []) if isinstance(f, str)]
        res.sections.append(Section("tuning", trials if len(trials) else None, summary.get("text"), files))
    else:
        trials_csv, text_file = folder / "trials.csv", folder / "summary.txt"
        table = _read_csv(trials_csv) if trials_csv.exists() else None
        text = text_file.read_text(encoding="utf-8") if text_file.exists() else None
        if table is not None or text is not None:
            files = [p for p in (trials_csv, text_file) if p.exists()] + sorted(folder.glob("*.png"))
            res.sections.append(Section("tuning", table, text, files))
    if folder.is_dir():
        for sub in sorted(folder.rglob(TRACKING_FILE)):
            res.batches.append(_read_batch_folder(sub.parent, sub.parent.name))
    return res


def collect_results(
    results_dir: str | Path,
    stage: str,
    labels: Sequence[str] | None = None,
    analysis_type: str | None = None,
) -> StageResults:
    """Find the results of ``stage`` under ``results_dir`` (restricted to ``labels`` when given).

    Parameters
    ----------
    results_dir : path
        The ``results/`` folder.
    stage : str
        One of :data:`STAGES`.
    labels : sequence of str, optional
        Only folders about these labels.
    analysis_type : {'feature_importance', 'residual_analysis'}, optional
        With ``stage='analysis'``, only this analysis.
    """
    if stage not in STAGES:
        raise SpecabundError(f"unknown result type {stage!r}; choose from {', '.join(STAGES)}")
    results_dir = Path(results_dir)
    labels = list(labels) if labels else None
    if stage == "analysis":
        return _analysis(results_dir, labels, analysis_type)
    if stage == "tuning":
        return _tuning(results_dir)
    res = StageResults(stage, results_dir, labels)
    prefix = {
        "training": "training",
        "evaluation": "evaluation",
        "prediction": "prediction",
        "baseline": "baseline",
    }
    res.searched.append(str(batch_results_dir(results_dir, prefix[stage], "*")))
    res.batches = _glob_batch(results_dir, prefix[stage], labels)
    if stage == "evaluation":
        res.searched.append(str(result_folder(results_dir, "evaluation")))
        sec = _files_section("evaluation", result_folder(results_dir, "evaluation"), labels)
        if sec is not None:
            res.sections.append(sec)
    elif stage == "prediction":
        res.searched.append(str(result_folder(results_dir, "prediction")))
        sec = _files_section("predictions", result_folder(results_dir, "prediction"), labels)
        if sec is not None:
            res.sections.append(sec)
    elif stage == "baseline":
        comp = result_folder(results_dir, "baseline") / "comparison.csv"
        res.searched.append(str(comp))
        if comp.exists():
            table = _read_csv(comp)
            if table is not None:
                table = _filter_label_rows(table, labels)
            files = [comp, *sorted(comp.parent.glob("*.png"))]
            res.sections.append(Section("model comparison", table, None, files))
            if table is not None and "labels_only" in set(table["model"].astype(str)):
                from ..baselines.comparison import labels_only_verdicts

                verdicts = labels_only_verdicts(table)
                text = (
                    "Each model's test RMSE against the labels-only baseline (gradient boosting of the "
                    "label on the catalogue's Teff, logg and [Fe/H], no spectrum). A ratio clearly below 1 "
                    "(< 0.6) means the model reads the element from the spectrum; near 1 it restates the "
                    "correlations of its training set."
                )
                res.sections.append(Section("labels-only check", verdicts, text, [comp]))
    return res


def _fmt_table(df: pd.DataFrame, max_rows: int = MAX_ROWS) -> str:
    df = df.drop(columns=[c for c in ("recorded_at",) if c in df.columns])
    note = ""
    if len(df) > max_rows:
        note = f"(last {max_rows} of {len(df)} rows)\n"
        df = df.tail(max_rows)

    def fmt(x: Any) -> str:
        if isinstance(x, (float, np.floating)):
            return "nan" if not np.isfinite(x) else f"{x:.4g}"
        return str(x)

    shown = df.copy()
    for c in shown.columns:
        if shown[c].dtype == object:
            shown[c] = shown[c].astype(str).str.slice(0, 60)
    return note + shown.to_string(index=False, line_width=110, formatters={c: fmt for c in shown.columns})


def render_text(found: StageResults) -> str:
    """Terminal text: per batch folder its table, summary, trend plot and plots; then the other results."""
    if found.empty:
        return found.no_results_message()
    out = [f"== {found.stage} results under {found.results_dir} =="]
    for b in found.batches:
        out.append("")
        out.append(f"-- {b.name}: {len(b.table)} batches ({b.folder}) --")
        if len(b.table):
            out.append(_fmt_table(b.table))
        out.append("")
        out.append(b.summary_text().rstrip())
        if b.trend_plot is not None:
            out.append(f"trend plot: {b.trend_plot}")
        if b.plots:
            more = f" (+{len(b.plots) - 5} more)" if len(b.plots) > 5 else ""
            out.append("plots: " + ", ".join(str(p.relative_to(b.folder)) for p in b.plots[:5]) + more)
    for s in found.sections:
        out.append("")
        out.append(f"-- {s.title} --")
        if s.text:
            out.append(s.text.rstrip())
        if s.table is not None and len(s.table):
            out.append(_fmt_table(s.table))
        if s.files:
            out.append(
                "files: " + ", ".join(str(p) for p in s.files[:12]) + (" ..." if len(s.files) > 12 else "")
            )
    return "\n".join(out)


def _records(df: pd.DataFrame | None) -> list[dict[str, Any]] | None:
    if df is None:
        return None
    return to_jsonable(df.astype(object).where(pd.notna(df), None).to_dict(orient="records"))


def render_json(found: StageResults) -> dict[str, Any]:
    """JSON-ready dictionary of the same content (NaN become null)."""
    out: dict[str, Any] = {
        "stage": found.stage,
        "results_dir": str(found.results_dir),
        "labels": found.labels,
        "analysis_type": found.analysis_type,
        "found": not found.empty,
        "searched": found.searched,
    }
    if found.empty:
        out["message"] = found.no_results_message()
        out["command"] = found.command()
    out["batch_results"] = [
        {
            "name": b.name,
            "folder": str(b.folder),
            "n_batches": len(b.table),
            "columns": [str(c) for c in b.table.columns],
            "rows": _records(b.table),
            "summary_file": str(b.summary_file) if b.summary_file else None,
            "trend_plot": str(b.trend_plot) if b.trend_plot else None,
            "plots": [str(p) for p in b.plots],
        }
        for b in found.batches
    ]
    out["sections"] = [
        {"title": s.title, "table": _records(s.table), "text": s.text, "files": [str(p) for p in s.files]}
        for s in found.sections
    ]
    return to_jsonable(out)
