"""Running the feature-importance and residual analyses over batches of spectra, resumably.

Outputs of :func:`run_feature_importance` (``out_dir`` is normally ``results/feature_importance``)::

    <label>_feature_importance.png    importance spectrum, occlusion profile, top regions, known lines
    <label>_top_regions.csv           rank, wave_start, wave_end, importance, lines
    <label>_explanation.txt           regions -> lines, own lines vs other species, verdict
    <label>_importance.npz            wavelength, importance, spread, signed, occlusion (+ spread)
    <label>_importance_summary.json   fractions, convergence and IG/occlusion agreement

Outputs of :func:`run_residual_analysis` (``out_dir`` normally ``results/residual_analysis``)::

    <label>_residual_analysis.png, <label>_residual_report.txt, <label>_predictions.csv,
    <label>_residual_summary.json

With ``save_batch_results=True`` the spectra are processed in batches of ``batch_size`` and
``<out_dir>/<label>_batch_results/`` receives per batch ``batch_<k>_feature_importance.png`` and
``batch_<k>_explanation.txt`` (and ``batch_<k>_attributions.npz``, the running sums), or
``batch_<k>_residual_analysis.png``, ``batch_<k>_residual_report.txt`` and ``batch_<k>_predictions.csv``,
plus a row of ``batch_tracking.csv`` (:class:`~specabund.tracking.BatchTracker`) and at the end
``<label>_batch_trends.png`` and ``<label>_batch_summary.txt``. A batch counts as done once its row exists;
an interrupted run continues at the next batch and gives the same final outputs as an uninterrupted one.
If the model, the data, the batch size or the settings changed, the old batch results are removed and the
run starts afresh (``analysis_state.json`` holds the fingerprint).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..dataset import Dataset
from ..errors import ConfigError, DataMismatchError
from ..metrics import DEFAULT_SNR_BINS
from ..plotting import save_figure
from ..tracking import TRACKING_FILE, BatchTracker
from ..training.saved import WEIGHTS_FILE, LoadedEnsemble, LoadedModel
from ..utils import atomic_write, atomic_write_json, atomic_write_text, hash_bytes, hash_file, hash_json
from .explain import explain_importance, explanation_text
from .importance import (
    AttributionStats,
    ImportanceSettings,
    LabelMean,
    agreement,
    attribute_batch,
    importance_figure,
    top_regions,
)
from .residuals import prediction_frame, residual_figure, residual_metrics, residual_report_text

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_IMPORTANCE_DIR",
    "RESIDUAL_ANALYSIS_DIR",
    "AnalysisResult",
    "batch_folder",
    "run_feature_importance",
    "run_residual_analysis",
    "select_spectra",
]

FEATURE_IMPORTANCE_DIR = "feature_importance"
RESIDUAL_ANALYSIS_DIR = "residual_analysis"
STATE_FILE = "analysis_state.json"
IMPORTANCE_TRENDS = (
    "own_fraction",
    "enrichment",
    "top1_importance",
    "ig_relative_delta",
    "ig_occlusion_spearman",
)
RESIDUAL_TRENDS = ("rmse", "mae", "bias", "robust_scatter", "r2")

BatchCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class AnalysisResult:
    """What an analysis run produced.

    Attributes
    ----------
    label, kind : str
        The label and ``'feature_importance'`` or ``'residual_analysis'``.
    files : dict
        Output paths by role.
    summary : dict
        Headline numbers (JSON-ready).
    batches_run, batches_skipped : list of int
        Batches computed in this call and batches reused from an earlier (interrupted) call.
    """

    label: str
    kind: str
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    batches_run: list[int] = field(default_factory=list)
    batches_skipped: list[int] = field(default_factory=list)


def batch_folder(out_dir: str | Path, label: str) -> Path:
    """``<out_dir>/<label>_batch_results``."""
    return Path(out_dir) / f"{label}_batch_results"


def select_spectra(n: int, max_spectra: int | None, seed: int) -> np.ndarray:
    """Indices of the analysed spectra: all, or ``max_spectra`` drawn without replacement (sorted)."""
    if max_spectra is None or max_spectra <= 0 or max_spectra >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_spectra), replace=False))


def _members(model: LoadedModel | LoadedEnsemble) -> list[LoadedModel]:
    return list(model.members) if isinstance(model, LoadedEnsemble) else [model]


def _model_hash(model: LoadedModel | LoadedEnsemble) -> str:
    parts = []
    for m in _members(model):
        w = Path(m.run_dir) / WEIGHTS_FILE
        parts.append(hash_file(w) if w.exists() else hash_json(m.config))
    return hash_json(parts)


def _chunks(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


class _Batches:
    """Per-batch bookkeeping: fingerprint, tracker, clearing stale results."""

    def __init__(self, folder: Path, label: str, fingerprint: str, n_batches: int, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled
        self.tracker = BatchTracker(folder, label)
        self.fingerprint = fingerprint
        self.n_batches = n_batches
        if enabled:
            self._check_state()

    def _check_state(self) -> None:
        state_path = self.folder / STATE_FILE
        state: dict[str, Any] = {}
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                state = {}
        has_rows = bool(self.tracker.completed())
        if has_rows and state.get("fingerprint") != self.fingerprint:
            logger.info(
                "%s: model, data or settings changed since the batch results were written; starting afresh",
                self.folder,
            )
            self._clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state_path, {"fingerprint": self.fingerprint, "n_batches": self.n_batches})

    def _clear(self) -> None:
        for p in self.folder.iterdir():
            ours = p.name.startswith("batch_") or p.name == TRACKING_FILE
            if p.is_file() and (ours or p.name.endswith(("_batch_trends.png", "_batch_summary.txt"))):
                p.unlink()

    def finish(
        self,
        result: AnalysisResult,
        files: dict[str, Any],
        summary: dict[str, Any],
        summary_path: Path,
        trends: Sequence[str],
    ) -> AnalysisResult:
        """Write ``summary`` to ``summary_path`` and, with batches, the trend plot and summary of the
        ``trends`` columns across them; return ``result`` holding the files and the summary."""
        files["summary"] = summary_path
        atomic_write_json(summary_path, summary)
        if self.enabled:
            cols = [c for c in trends if c in self.tracker.table().columns]
            files.update({f"batch_{k}": v for k, v in self.tracker.finalize(cols).items()})
            files["batch_folder"] = self.folder
        result.files = files
        result.summary = summary
        return result

    def done(self, k: int, needed: Sequence[str]) -> bool:
        return (
            self.enabled
            and self.tracker.is_done(k)
            and all(self.tracker.batch_path(k, s).exists() for s in needed)
        )


def _fingerprint(
    kind: str, label: str, model: Any, X: np.ndarray, ivar: np.ndarray, extra: dict[str, Any]
) -> str:
    return hash_json(
        {
            "kind": kind,
            "label": label,
            "model": _model_hash(model),
            "data": hash_bytes(np.ascontiguousarray(X).tobytes(), np.ascontiguousarray(ivar).tobytes()),
            **extra,
        }
    )


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ConfigError(f"analysis batch size must be >= 1, got {batch_size}")


def run_feature_importance(
    model: LoadedModel | LoadedEnsemble,
    dataset: Dataset,
    label: str,
    out_dir: str | Path,
    *,
    settings: ImportanceSettings | None = None,
    batch_size: int = 32,
    save_batch_results: bool = False,
    max_spectra: int | None = None,
    seed: int = 42,
    on_batch: BatchCallback | None = None,
) -> AnalysisResult:
    """Integrated-gradients (and occlusion) importance of ``label`` over the spectra of ``dataset``.

    Parameters
    ----------
    model : LoadedModel or LoadedEnsemble
        The trained network(s) (see :func:`specabund.training.load_model`).
    dataset : Dataset
        Spectra on the model's grid.
    label : str
        One of ``model.labels``.
    out_dir : path
        Output folder (``results/feature_importance``).
    settings : ImportanceSettings
        Attribution and region settings.
    batch_size : int
        Spectra per analysis batch.
    save_batch_results : bool
        Write per-batch outputs and tracking (resumable); see the module docstring.
    max_spectra : int, optional
        Analyse at most this many spectra (drawn with ``seed``).
    seed : int
        Seed of that draw.
    on_batch : callable, optional
        ``on_batch(k, row)`` after batch ``k`` is recorded (only with ``save_batch_results``).

    Returns
    -------
    AnalysisResult
    """
    settings = settings or ImportanceSettings()
    _check_batch_size(batch_size)
    fn = LabelMean(model, label)
    out_dir = Path(out_dir)
    idx = select_spectra(len(dataset), max_spectra, seed)
    if idx.size == 0:
        raise DataMismatchError("no spectra to analyse")
    X = dataset.X[idx]
    ivar = dataset.ivar[idx]
    wl = np.asarray(dataset.wavelength, dtype=float)
    chunks = _chunks(len(idx), int(batch_size))
    fp = _fingerprint(
        "feature_importance",
        label,
        model,
        X,
        ivar,
        {"settings": settings.to_dict(), "batch_size": batch_size},
    )
    folder = batch_folder(out_dir, label)
    batches = _Batches(folder, label, fp, len(chunks), save_batch_results)
    result = AnalysisResult(label=label, kind="feature_importance")
    total = AttributionStats(n_pixels=X.shape[1])
    needed = ("attributions.npz", "feature_importance.png", "explanation.txt")
    for k, rows in enumerate(chunks, start=1):
        if batches.done(k, needed):
            total = total.merge(AttributionStats.load(batches.tracker.batch_path(k, "attributions.npz")))
            result.batches_skipped.append(k)
            continue
        stats, delta = attribute_batch(fn, X[rows], ivar[rows], settings)
        total = total.merge(stats)
        result.batches_run.append(k)
        logger.debug("%s batch %d: %d spectra, max |delta| %.3g", label, k, len(rows), np.abs(delta).max())
        if save_batch_results:
            tr = batches.tracker
            regions = _regions(wl, stats, settings)
            expl = explain_importance(label, wl, stats.importance, settings.own_line_half_width)
            agree = agreement(wl, stats, settings)
            stats.save(tr.batch_path(k, "attributions.npz"))
            title = f"{label}: feature importance, batch {k} ({len(rows)} spectra)"
            save_figure(importance_figure(wl, stats, label, regions, title=title),
                        tr.batch_path(k, "feature_importance.png"))  # fmt: skip
            notes = _importance_notes(stats, agree, settings)
            atomic_write_text(
                tr.batch_path(k, "explanation.txt"), explanation_text(expl, regions, title, notes)
            )
            row = _importance_row(stats, expl, regions, agree)
            tr.record(k, row)
            if on_batch is not None:
                on_batch(k, row)
    regions = _regions(wl, total, settings)
    expl = explain_importance(label, wl, total.importance, settings.own_line_half_width)
    agree = agreement(wl, total, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["plot"] = save_figure(
        importance_figure(wl, total, label, regions), out_dir / f"{label}_feature_importance.png"
    )
    files["regions"] = out_dir / f"{label}_top_regions.csv"
    with atomic_write(files["regions"], "w", encoding="utf-8", newline="") as fh:
        regions[["rank", "wave_start", "wave_end", "importance", "lines"]].to_csv(fh, index=False)
    files["explanation"] = out_dir / f"{label}_explanation.txt"
    notes = _importance_notes(total, agree, settings)
    atomic_write_text(files["explanation"], explanation_text(expl, regions, notes=notes))
    files["arrays"] = out_dir / f"{label}_importance.npz"
    from ..utils import atomic_savez

    atomic_savez(
        files["arrays"],
        wavelength=wl,
        importance=total.importance,
        spread=total.spread,
        signed=total.signed,
        occlusion=total.occlusion_importance,
        occlusion_spread=total.occlusion_spread,
    )
    summary = {
        "label": label,
        "n_spectra": total.n_ig,
        "n_occluded": total.n_occ,
        **{k: v for k, v in expl.to_dict().items() if k != "label"},
        "ig_relative_delta": total.relative_delta,
        "ig_max_abs_delta": total.delta_abs_max,
        **agree,
        "top_regions": regions.drop(columns=["centre"]).to_dict(orient="records"),
        "settings": settings.to_dict(),
        "model": str(model.run_dir),
    }
    return batches.finish(
        result, files, summary, out_dir / f"{label}_importance_summary.json", IMPORTANCE_TRENDS
    )


def _regions(wl: np.ndarray, stats: AttributionStats, settings: ImportanceSettings) -> pd.DataFrame:
    return top_regions(
        wl,
        stats.importance,
        top_n=settings.top_n_regions,
        smooth_pixels=settings.smooth_pixels,
        max_half_width=settings.max_region_half_width,
        line_pad=settings.own_line_half_width,
    )


def _importance_notes(
    stats: AttributionStats, agree: dict[str, float], settings: ImportanceSettings
) -> list[str]:
    return [
        f"Attribution: integrated gradients ({settings.ig_steps} Gauss-Legendre steps, baseline = flat "
        f"continuum, flux = 1) of the predicted mean, network in eval mode; {stats.n_ig} spectra.",
        f"Completeness: mean |convergence delta| / mean |F(x) - F(baseline)| = {stats.relative_delta:.2e}, "
        f"max |delta| = {stats.delta_abs_max:.2e}.",
        f"Cross-check: occlusion of {settings.occlusion_window}-pixel windows "
        f"(stride {settings.occlusion_stride}) on {stats.n_occ} spectra; "
        f"Spearman rho(IG, occlusion) = {agree['ig_occlusion_spearman']:.3f}, "
        f"fraction of IG top regions also top for occlusion = {agree['top_region_overlap']:.2f}.",
    ]


def _importance_row(
    stats: AttributionStats, expl: Any, regions: pd.DataFrame, agree: dict[str, float]
) -> dict[str, Any]:
    top = regions.iloc[0] if len(regions) else None
    return {
        "n_spectra": stats.n_ig,
        "own_fraction": expl.own_fraction,
        "other_fraction": expl.other_fraction,
        "enrichment": expl.enrichment,
        "top1_centre": float(top["centre"]) if top is not None else math.nan,
        "top1_importance": float(top["importance"]) if top is not None else math.nan,
        "top1_lines": str(top["lines"]) if top is not None else "",
        "ig_relative_delta": stats.relative_delta,
        "ig_max_abs_delta": stats.delta_abs_max,
        **agree,
    }


def run_residual_analysis(
    model: LoadedModel | LoadedEnsemble,
    dataset: Dataset,
    label: str,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    save_batch_results: bool = False,
    max_spectra: int | None = None,
    seed: int = 42,
    snr_bins: Sequence[float] = DEFAULT_SNR_BINS,
    predict_batch_size: int = 256,
    on_batch: BatchCallback | None = None,
) -> AnalysisResult:
    """Predict ``label`` for the spectra of ``dataset`` and analyse the residuals against the truth.

    Parameters are as in :func:`run_feature_importance`; ``label`` must be a label of both the model and
    the dataset (the true values). ``snr_bins`` are the edges of the SNR bins of the report.
    """
    _check_batch_size(batch_size)
    if label not in model.labels:
        raise DataMismatchError(f"model {model.run_dir} does not predict {label!r} (labels: {model.labels})")
    if label not in dataset.elements:
        raise DataMismatchError(
            f"the data have no true values of {label!r} (labels: {dataset.elements}); residual analysis "
            "needs a reference dataset such as processed_data/test_dataset.npz"
        )
    j = model.labels.index(label)
    out_dir = Path(out_dir)
    idx = select_spectra(len(dataset), max_spectra, seed)
    if idx.size == 0:
        raise DataMismatchError("no spectra to analyse")
    sub = dataset.subset(idx)
    chunks = _chunks(len(idx), int(batch_size))
    fp = _fingerprint(
        "residual_analysis", label, model, sub.X, sub.ivar,
        {"batch_size": batch_size, "y": hash_bytes(sub.y[:, sub.label_index(label)].tobytes()),
         "snr_bins": [float(b) for b in snr_bins]},
    )  # fmt: skip
    folder = batch_folder(out_dir, label)
    batches = _Batches(folder, label, fp, len(chunks), save_batch_results)
    result = AnalysisResult(label=label, kind="residual_analysis")
    frames = []
    needed = ("predictions.csv", "residual_analysis.png", "residual_report.txt")
    for k, rows in enumerate(chunks, start=1):
        tr = batches.tracker
        if batches.done(k, needed):
            frames.append(pd.read_csv(tr.batch_path(k, "predictions.csv"), keep_default_na=True,
                                      dtype={"spec": str, "obsid": str, "filename": str}))  # fmt: skip
            result.batches_skipped.append(k)
            continue
        part = sub.subset(rows)
        mean, sigma = model.predict(part.X, part.ivar, predict_batch_size)
        df = prediction_frame(part, label, mean[:, j], sigma[:, j])
        frames.append(df)
        result.batches_run.append(k)
        if save_batch_results:
            with atomic_write(tr.batch_path(k, "predictions.csv"), "w", encoding="utf-8", newline="") as fh:
                df.to_csv(fh, index=False)
            title = f"{label}: residual analysis, batch {k} ({len(rows)} spectra)"
            save_figure(residual_figure(df, label, title), tr.batch_path(k, "residual_analysis.png"))
            atomic_write_text(tr.batch_path(k, "residual_report.txt"),
                              residual_report_text(df, label, title, snr_bins))  # fmt: skip
            row = residual_metrics(df)
            tr.record(k, row)
            if on_batch is not None:
                on_batch(k, row)
    df = pd.concat(frames, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["predictions"] = out_dir / f"{label}_predictions.csv"
    with atomic_write(files["predictions"], "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    files["plot"] = save_figure(residual_figure(df, label), out_dir / f"{label}_residual_analysis.png")
    files["report"] = out_dir / f"{label}_residual_report.txt"
    notes = [f"Model: {model.run_dir}"]
    atomic_write_text(files["report"], residual_report_text(df, label, snr_bins=snr_bins, notes=notes))
    summary = {"label": label, **residual_metrics(df), "model": str(model.run_dir)}
    return batches.finish(result, files, summary, out_dir / f"{label}_residual_summary.json", RESIDUAL_TRENDS)
