"""Figures of training progress and of evaluation results (``matplotlib.figure.Figure`` objects)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..metrics import regression_metrics

PARAM_LABELS = {"snr": "SNR (g)", "teff": "Teff [K]", "logg": "log g", "fe_h": "[Fe/H]"}


def _grid(n: int, ncol_max: int = 3, size: tuple[float, float] = (4.2, 3.6)) -> tuple[Figure, list]:
    ncol = min(max(n, 1), ncol_max)
    nrow = math.ceil(max(n, 1) / ncol)
    fig = Figure(figsize=(size[0] * ncol, size[1] * nrow), layout="constrained")
    axes = list(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _metrics_text(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    m = regression_metrics(y_true, y_pred)
    return (
        f"n={m['n']}\nbias={m['bias']:.3g}\nscatter={m['robust_scatter']:.3g}\n"
        f"RMSE={m['rmse']:.3g}\nR2={m['r2']:.3f}"
    )


def training_curves_figure(history: pd.DataFrame, labels: Sequence[str], title: str | None = None) -> Figure:
    """Loss curves, learning rate and per-label validation RMSE and R2 against epoch."""
    fig, axes = _grid(4, 2, (5.0, 3.4))
    ep = history["epoch"].to_numpy()
    ax = axes[0]
    ax.plot(ep, history["train_loss"], "o-", ms=2, label="train")
    ax.plot(ep, history["val_loss"], "o-", ms=2, label="validation")
    if "best_epoch" in history and len(history):
        ax.axvline(int(history["best_epoch"].iloc[-1]), color="0.5", ls="--", lw=1, label="best")
    ax.set_ylabel("loss (NLL, standardised)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(ep, history["lr"], "-")
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    for lab in labels:
        if f"{lab}_rmse" in history:
            axes[2].plot(ep, history[f"{lab}_rmse"], "-", label=lab)
        if f"{lab}_r2" in history:
            axes[3].plot(ep, history[f"{lab}_r2"], "-", label=lab)
    axes[2].set_ylabel("validation RMSE (physical)")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("validation R2")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if labels:
        axes[2].legend(fontsize=7)
    fig.suptitle(title or "training")
    return fig


def pred_vs_true_figure(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sigma: np.ndarray | None,
    labels: Sequence[str],
    title: str | None = None,
) -> Figure:
    """Predicted against true value per label, with the one-to-one line and metrics."""
    fig, axes = _grid(len(labels))
    for j, lab in enumerate(labels):
        ax = axes[j]
        t, p = y_true[:, j], y_pred[:, j]
        ok = np.isfinite(t) & np.isfinite(p)
        if sigma is not None:
            sc = ax.scatter(t[ok], p[ok], c=sigma[ok, j], s=4, cmap="viridis", alpha=0.7)
            fig.colorbar(sc, ax=ax, label="predicted sigma")
        else:
            ax.scatter(t[ok], p[ok], s=4, alpha=0.6)
        if ok.any():
            lo, hi = np.nanmin([t[ok].min(), p[ok].min()]), np.nanmax([t[ok].max(), p[ok].max()])
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.text(0.03, 0.97, _metrics_text(t, p), transform=ax.transAxes, va="top", fontsize=7)
        ax.set_xlabel(f"{lab} true")
        ax.set_ylabel(f"{lab} predicted")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "predicted vs true")
    return fig


def one_to_one_figure(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    label: str,
    color: np.ndarray | None = None,
    color_label: str = "SNR",
) -> Figure:
    """One-to-one plot with a residual panel below (residual = predicted - true)."""
    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    ax, axr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ok = np.isfinite(y_true) & np.isfinite(y_pred)
    t, p = y_true[ok], y_pred[ok]
    r = p - t
    kw = {"s": 5, "alpha": 0.7}
    if color is not None:
        sc = ax.scatter(t, p, c=color[ok], cmap="viridis", **kw)
        fig.colorbar(sc, ax=[ax, axr], label=color_label)
        axr.scatter(t, r, c=color[ok], cmap="viridis", **kw)
    else:
        ax.scatter(t, p, **kw)
        axr.scatter(t, r, **kw)
    if t.size:
        lo, hi = min(t.min(), p.min()), max(t.max(), p.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    axr.axhline(0, color="k", lw=1, ls="--")
    ax.text(0.03, 0.97, _metrics_text(y_true, y_pred), transform=ax.transAxes, va="top", fontsize=8)
    ax.set_ylabel(f"{label} predicted")
    axr.set_xlabel(f"{label} true")
    axr.set_ylabel("pred - true")
    for a in (ax, axr):
        a.grid(alpha=0.3)
    ax.set_title(f"{label}: one-to-one")
    return fig


def _running_median(x: np.ndarray, y: np.ndarray, n_bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 * n_bins:
        return np.array([]), np.array([])
    edges = np.quantile(x, np.linspace(0, 1, n_bins + 1))
    centres, meds = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (x >= lo) & (x <= hi)
        if sel.sum() >= 3:
            centres.append(np.median(x[sel]))
            meds.append(np.median(y[sel]))
    return np.asarray(centres), np.asarray(meds)


def residual_vs_params_figure(residual: np.ndarray, params: Mapping[str, np.ndarray], label: str) -> Figure:
    """Residual against each stellar parameter (keys such as ``snr``, ``teff``, ``logg``, ``fe_h``)."""
    keys = [k for k, v in params.items() if np.isfinite(np.asarray(v, dtype=float)).any()]
    fig, axes = _grid(max(len(keys), 1), 2, (4.6, 3.2))
    if not keys:
        axes[0].text(0.5, 0.5, "no stellar parameters available", ha="center", va="center")
    for ax, k in zip(axes, keys, strict=False):
        x = np.asarray(params[k], dtype=float)
        ax.scatter(x, residual, s=4, alpha=0.5)
        cx, my = _running_median(x, residual)
        if cx.size:
            ax.plot(cx, my, "r-", lw=1.5, label="running median")
            ax.legend(fontsize=7)
        ax.axhline(0, color="k", ls="--", lw=1)
        if k == "snr":
            ax.set_xscale("log")
        ax.set_xlabel(PARAM_LABELS.get(k, k))
        ax.set_ylabel(f"{label} pred - true")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{label}: residuals against stellar parameters")
    return fig


def residual_hist_figure(residuals: Mapping[str, np.ndarray]) -> Figure:
    """Histogram of the residuals of each label, with the robust scatter."""
    labels = list(residuals)
    fig, axes = _grid(len(labels), 3, (4.0, 3.0))
    for ax, lab in zip(axes, labels, strict=False):
        r = np.asarray(residuals[lab], dtype=float)
        r = r[np.isfinite(r)]
        if r.size:
            ax.hist(r, bins=min(60, max(10, r.size // 10)), color="C0", alpha=0.8)
            m = regression_metrics(r, np.zeros_like(r))
            ax.set_title(f"{lab}: median {np.median(r):.3g}, scatter {m['robust_scatter']:.3g}", fontsize=9)
        ax.axvline(0, color="k", ls="--", lw=1)
        ax.set_xlabel("pred - true")
        ax.grid(alpha=0.3)
    fig.suptitle("residual distributions")
    return fig


def kiel_figure(
    teff: np.ndarray,
    logg: np.ndarray,
    values: np.ndarray,
    residual: np.ndarray,
    label: str,
    isochrones: Sequence[pd.DataFrame] | None = None,
) -> Figure:
    """Kiel diagram (Teff against log g, both axes inverted) coloured by the label and by the residual.

    ``isochrones`` (from :func:`~specabund.training.evaluate.read_mist_iso`) are drawn as lines; only
    phases up to core-helium burning are shown when a ``phase`` column is present.
    """
    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    ok = np.isfinite(teff) & np.isfinite(logg)
    finite_r = residual[ok & np.isfinite(residual)]
    lim = float(np.quantile(np.abs(finite_r), 0.95)) if finite_r.size else 1.0
    for ax, c, cmap, clabel, vlim in (
        (axes[0], values, "viridis", label, None),
        (axes[1], residual, "coolwarm", f"{label} pred - true", (-lim, lim)),
    ):
        sel = ok & np.isfinite(c)
        kw = {"vmin": vlim[0], "vmax": vlim[1]} if vlim and lim > 0 else {}
        sc = ax.scatter(teff[sel], logg[sel], c=c[sel], s=5, cmap=cmap, **kw)
        fig.colorbar(sc, ax=ax, label=clabel)
        for iso in isochrones or []:
            df = iso
            if "phase" in df:
                df = df[(df["phase"] >= 0) & (df["phase"] <= 3)]
            ax.plot(10 ** df["log_Teff"].to_numpy(), df["log_g"].to_numpy(), "-", color="0.3", lw=0.8)
        ax.set_xlabel("Teff [K]")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log g")
    if ok.any():
        axes[0].set_xlim(np.nanmax(teff[ok]) + 100, np.nanmin(teff[ok]) - 100)
        axes[0].set_ylim(np.nanmax(logg[ok]) + 0.2, np.nanmin(logg[ok]) - 0.2)
    else:
        axes[0].invert_xaxis()
        axes[0].invert_yaxis()
    fig.suptitle(f"Kiel diagram: {label}")
    return fig
