"""Per-batch diagnostic figures of the baselines (one-to-one and residual histogram)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..metrics import regression_metrics


def one_to_one_figure(
    y_true: np.ndarray, y_pred: np.ndarray, snr: np.ndarray | None, element: str, title: str = ""
) -> Figure:
    """Predicted against true label, coloured by SNR, with the 1:1 line and the metrics in a corner."""
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.subplots()
    ok = np.isfinite(t) & np.isfinite(p)
    if ok.any():
        c = np.asarray(snr, dtype=float)[ok] if snr is not None else None
        sc = ax.scatter(t[ok], p[ok], c=c, s=6, cmap="viridis", alpha=0.8, lw=0)
        if c is not None:
            fig.colorbar(sc, ax=ax, label="SNR")
        lo = float(min(t[ok].min(), p[ok].min()))
        hi = float(max(t[ok].max(), p[ok].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        m = regression_metrics(t, p)
        ax.text(
            0.03,
            0.97,
            f"n={m['n']}\nRMSE={m['rmse']:.4g}\nscatter={m['robust_scatter']:.4g}\nbias={m['bias']:.3g}\nR2={m['r2']:.3f}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
        )
    else:
        ax.text(0.5, 0.5, "no labelled spectra", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"true {element}")
    ax.set_ylabel(f"predicted {element}")
    ax.set_title(title, fontsize=9)
    return fig


def residual_histogram_figure(residuals: dict[str, np.ndarray], element: str, title: str = "") -> Figure:
    """Histograms of ``predicted - true`` for each named split (e.g. ``{'val': ..., 'test': ...}``)."""
    fig = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = fig.subplots()
    finite = {k: np.asarray(v, dtype=float)[np.isfinite(v)] for k, v in residuals.items()}
    allv = np.concatenate([v for v in finite.values()]) if finite else np.zeros(0)
    if allv.size:
        lim = float(np.percentile(np.abs(allv), 99.5)) or 1.0
        bins = np.linspace(-lim, lim, 41)
        for name, v in finite.items():
            if v.size:
                ax.hist(
                    np.clip(v, -lim, lim),
                    bins=bins,
                    histtype="step",
                    lw=1.4,
                    density=True,
                    label=f"{name} (n={v.size})",
                )
        ax.axvline(0, color="0.3", lw=0.8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no residuals", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"predicted - true {element}")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    return fig
