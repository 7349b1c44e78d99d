"""The model comparison table ``<out_root>/baseline/comparison.csv`` and its figure.

One row per (model, element, SNR bin) with the test-split metrics; ``snr_bin`` is ``'all'`` for the whole
test split or a bin name from :func:`specabund.metrics.snr_bin_labels`. Baselines and the CNN
(``model='cnn'``) add their rows through :func:`update_comparison`, which replaces rows with the same key.

The column ``rmse_ratio_labels_only`` divides each row's RMSE by that of the labels-only baseline (gradient
boosting of the label on the catalogue's Teff, logg and [Fe/H], no spectrum) for the same element and SNR
bin: an abundance model whose ratio is not clearly below 1 has learned the astrophysical correlations of
its training set rather than the element's lines (:func:`labels_only_verdicts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import DataMismatchError
from ..metrics import DEFAULT_SNR_BINS, snr_bin_labels
from ..plotting import save_figure
from ..utils import atomic_write

COMPARISON_COLUMNS: tuple[str, ...] = (
    "model",
    "element",
    "snr_bin",
    "n",
    "rmse",
    "robust_scatter",
    "bias",
    "r2",
)
KEY_COLUMNS: tuple[str, ...] = ("model", "element", "snr_bin")
#: Derived column: each row's RMSE over that of the labels-only baseline (same element and SNR bin).
RATIO_COLUMN = "rmse_ratio_labels_only"
LABELS_ONLY_MODEL = "labels_only"
#: Below this ratio a model has clearly learned more than the Teff/logg/[Fe/H] correlations.
CLEAR_WIN_RATIO = 0.6
METRIC_COLUMNS: tuple[str, ...] = ("rmse", "robust_scatter", "bias", "r2")


def comparison_dir(out_root: str | Path) -> Path:
    """``<out_root>/baseline``."""
    from ..workspace import result_folder

    return result_folder(out_root, "baseline")


def comparison_path(out_root: str | Path) -> Path:
    """``<out_root>/baseline/comparison.csv``."""
    return comparison_dir(out_root) / "comparison.csv"


def comparison_rows(
    model: str, element: str, by_snr: Mapping[str, Mapping[str, float]]
) -> list[dict[str, Any]]:
    """Rows for :func:`update_comparison` from the output of :func:`specabund.metrics.metrics_by_snr`."""
    return [
        {"model": model, "element": element, "snr_bin": name, **{k: m[k] for k in COMPARISON_COLUMNS[3:]}}
        for name, m in by_snr.items()
    ]


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=object if c in KEY_COLUMNS else float) for c in COMPARISON_COLUMNS}
    )


def read_comparison(out_root: str | Path) -> pd.DataFrame:
    """The comparison table (an empty frame with the right columns when none exists yet)."""
    path = comparison_path(out_root)
    if not path.exists():
        return with_labels_only_ratio(_empty())
    df = pd.read_csv(
        path,
        dtype={"model": str, "element": str, "snr_bin": str},
        keep_default_na=False,
        na_values={c: ["", "nan", "NaN"] for c in (*COMPARISON_COLUMNS[3:], RATIO_COLUMN)},
    )
    return with_labels_only_ratio(df[list(COMPARISON_COLUMNS)])


def with_labels_only_ratio(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the column ``rmse_ratio_labels_only`` (NaN where no labels-only row matches)."""
    out = df.copy()
    ref = out[out["model"].astype(str) == LABELS_ONLY_MODEL].set_index(["element", "snr_bin"])["rmse"]
    keys = list(zip(out["element"].astype(str), out["snr_bin"].astype(str), strict=True))
    base = np.array([float(ref.get(k, np.nan)) for k in keys], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[RATIO_COLUMN] = pd.to_numeric(out["rmse"], errors="coerce").to_numpy(dtype=float) / base
    return out


def labels_only_verdicts(df: pd.DataFrame, snr_bin: str = "all") -> pd.DataFrame:
    """Per (model, element) of the ``snr_bin`` rows: RMSE, the labels-only RMSE, their ratio and a verdict.

    ``verdict`` is ``'reads the spectrum'`` below :data:`CLEAR_WIN_RATIO`, ``'not clearly better than
    Teff/logg/[Fe/H] alone'`` up to 0.9 and ``'no better than Teff/logg/[Fe/H] alone'`` above; empty when
    no labels-only baseline ran for the element.
    """
    t = with_labels_only_ratio(df) if RATIO_COLUMN not in df.columns else df
    t = t[(t["snr_bin"].astype(str) == snr_bin) & (t["model"].astype(str) != LABELS_ONLY_MODEL)]
    rows = []
    for _, r in t.iterrows():
        ratio = float(r[RATIO_COLUMN])
        if not np.isfinite(ratio):
            verdict = ""
        elif ratio < CLEAR_WIN_RATIO:
            verdict = "reads the spectrum"
        elif ratio < 0.9:
            verdict = "not clearly better than Teff/logg/[Fe/H] alone"
        else:
            verdict = "no better than Teff/logg/[Fe/H] alone"
        rows.append(
            {
                "model": r["model"],
                "element": r["element"],
                "rmse": float(r["rmse"]),
                "rmse_labels_only": float(r["rmse"]) / ratio if np.isfinite(ratio) and ratio > 0 else np.nan,
                RATIO_COLUMN: ratio,
                "verdict": verdict,
            }
        )
    cols = ["model", "element", "rmse", "rmse_labels_only", RATIO_COLUMN, "verdict"]
    return pd.DataFrame(rows, columns=cols)


def _bin_order(edges: tuple[float, ...] = DEFAULT_SNR_BINS) -> dict[str, int]:
    return {name: i for i, name in enumerate(["all", *snr_bin_labels(edges)])}


def update_comparison(out_root: str | Path, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Insert or replace rows keyed by ``(model, element, snr_bin)`` and rewrite the CSV atomically.

    Parameters
    ----------
    out_root : Path
        Results root; the table is ``<out_root>/baseline/comparison.csv``.
    rows : iterable of mappings or DataFrame
        Rows with at least the columns ``model, element, snr_bin, n, rmse, robust_scatter, bias, r2``
        (extra keys are ignored).

    Returns
    -------
    DataFrame
        The whole updated table, sorted by model, element and SNR bin.
    """
    new = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if new.empty:
        return read_comparison(out_root)
    missing = [c for c in COMPARISON_COLUMNS if c not in new.columns]
    if missing:
        raise DataMismatchError(f"comparison rows lack columns {missing}")
    new = new[list(COMPARISON_COLUMNS)].copy()
    for c in KEY_COLUMNS:
        new[c] = new[c].astype(str)
    new = new.drop_duplicates(subset=list(KEY_COLUMNS), keep="last")
    old = read_comparison(out_root)[list(COMPARISON_COLUMNS)]
    if not old.empty:
        keys_new = set(map(tuple, new[list(KEY_COLUMNS)].to_numpy().tolist()))
        keep = [tuple(k) not in keys_new for k in old[list(KEY_COLUMNS)].to_numpy().tolist()]
        old = old[keep]
        df = pd.concat([old, new], ignore_index=True) if len(old) else new
    else:
        df = new
    order = _bin_order()
    df = df.assign(_b=df["snr_bin"].map(lambda b: order.get(b, len(order))))
    df = df.sort_values(["model", "element", "_b", "snr_bin"]).drop(columns="_b").reset_index(drop=True)
    df["n"] = pd.to_numeric(df["n"]).astype(int)
    df = with_labels_only_ratio(df[list(COMPARISON_COLUMNS)])
    with atomic_write(comparison_path(out_root), "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    return df


def comparison_figure(df: pd.DataFrame) -> Figure:
    """Grouped bars of RMSE, robust scatter, bias and R2 per SNR bin, one row of panels per element.

    Every model in ``df`` gets one bar per SNR bin (``'all'`` first).
    """
    elements = sorted(df["element"].astype(str).unique()) if len(df) else []
    models = sorted(df["model"].astype(str).unique()) if len(df) else []
    order = _bin_order()
    nrow = max(len(elements), 1)
    fig = Figure(figsize=(4.0 * len(METRIC_COLUMNS), 2.8 * nrow), layout="constrained")
    axes = fig.subplots(nrow, len(METRIC_COLUMNS), squeeze=False)
    if not elements:
        axes[0, 0].text(0.5, 0.5, "no comparison rows", ha="center", va="center")
        return fig
    width = 0.8 / max(len(models), 1)
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for r, el in enumerate(elements):
        sub = df[df["element"].astype(str) == el]
        bins = sorted(sub["snr_bin"].astype(str).unique(), key=lambda b: (order.get(b, len(order)), b))
        x = np.arange(len(bins))
        for c, metric in enumerate(METRIC_COLUMNS):
            ax = axes[r, c]
            for i, model in enumerate(models):
                ms = sub[sub["model"].astype(str) == model].set_index("snr_bin")
                vals = [float(ms.loc[b, metric]) if b in ms.index else np.nan for b in bins]
                ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, color=colors[model], label=model)
            ax.set_xticks(x, bins, fontsize=8)
            ax.set_title(f"{el}: {metric}", fontsize=9)
            if metric == "bias":
                ax.axhline(0, color="0.3", lw=0.8)
            ax.grid(axis="y", alpha=0.3)
        axes[r, 0].set_ylabel("test split")
    axes[0, -1].legend(fontsize=8, loc="best")
    return fig


def save_comparison_figure(out_root: str | Path, df: pd.DataFrame | None = None) -> Path:
    """Draw :func:`comparison_figure` to ``<out_root>/baseline/comparison.png``.

    The table is read from disk when ``df`` is None.
    """
    table = read_comparison(out_root) if df is None else df
    return save_figure(comparison_figure(table), comparison_dir(out_root) / "comparison.png")
