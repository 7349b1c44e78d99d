"""Regression metrics used by training, evaluation, baselines and analysis.

All functions ignore pairs where either value is NaN and return NaN when no pair is left.
"""

from __future__ import annotations

import itertools

import numpy as np

#: Default SNR bin edges (g-band SNR): <20, 20-50, 50-100, >100.
DEFAULT_SNR_BINS: tuple[float, ...] = (0.0, 20.0, 50.0, 100.0, np.inf)


def _valid(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_pred, dtype=float).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape}, y_pred has {p.shape}")
    ok = np.isfinite(t) & np.isfinite(p)
    return t[ok], p[ok]


def robust_scatter(x: np.ndarray) -> float:
    """1.4826 times the median absolute deviation from the median (sigma for a Gaussian)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Return ``n, mae, rmse, bias, robust_scatter, r2`` for one label.

    ``bias`` is mean(pred - true); ``robust_scatter`` is of the residuals.
    """
    t, p = _valid(y_true, y_pred)
    n = int(t.size)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "mae": nan, "rmse": nan, "bias": nan, "robust_scatter": nan, "r2": nan}
    r = p - t
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum(r**2)) / ss_tot if ss_tot > 0 else float("nan")
    return {
        "n": n,
        "mae": float(np.mean(np.abs(r))),
        "rmse": float(np.sqrt(np.mean(r**2))),
        "bias": float(np.mean(r)),
        "robust_scatter": robust_scatter(r),
        "r2": r2,
    }


def snr_bin_labels(edges: tuple[float, ...] | list[float] = DEFAULT_SNR_BINS) -> list[str]:
    """Human-readable names of SNR bins, e.g. ``'<20', '20-50', '>100'``."""
    out = []
    for lo, hi in itertools.pairwise(edges):
        if lo <= 0:
            out.append(f"<{hi:g}")
        elif not np.isfinite(hi):
            out.append(f">{lo:g}")
        else:
            out.append(f"{lo:g}-{hi:g}")
    return out


def metrics_by_snr(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    snr: np.ndarray,
    edges: tuple[float, ...] | list[float] = DEFAULT_SNR_BINS,
) -> dict[str, dict[str, float]]:
    """Metrics overall (key ``'all'``) and per SNR bin (left-closed bins)."""
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    snr = np.asarray(snr, dtype=float)
    out = {"all": regression_metrics(y_true, y_pred)}
    for name, lo, hi in zip(snr_bin_labels(edges), edges[:-1], edges[1:], strict=True):
        sel = (snr >= lo) & (snr < hi)
        out[name] = regression_metrics(y_true[sel], y_pred[sel])
    return out
