"""Figures of the prediction stage (each function returns a :class:`matplotlib.figure.Figure`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats


def _grid(n: int, ncol_max: int = 3, size: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, list]:
    n = max(n, 1)
    ncol = min(n, ncol_max)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(size[0] * ncol, size[1] * nrow), layout="constrained")
    axes = list(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _pull_panel(ax: Axes, series: Mapping[str, np.ndarray], title: str) -> None:
    bins = np.linspace(-5, 5, 41)
    for name, z in series.items():
        f = np.asarray(z, dtype=float)
        f = f[np.isfinite(f)]
        if f.size:
            width = 1.4826 * np.median(np.abs(f - np.median(f)))
            ax.hist(
                np.clip(f, -5, 5),
                bins=bins,
                density=True,
                histtype="step",
                lw=1.5,
                label=f"{name} (n={f.size}, width {width:.2f})",
            )
    x = np.linspace(-5, 5, 200)
    ax.plot(x, stats.norm.pdf(x), "k--", lw=1, label="N(0, 1)")
    ax.set_title(title)
    ax.set_xlabel("z = (pred - ref) / err")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def z_histogram_figure(
    labels: Sequence[str],
    z_before: np.ndarray,
    scale: np.ndarray,
    z_test: np.ndarray | None = None,
    title: str = "calibration: pulls vs N(0, 1)",
) -> Figure:
    """Histograms of the pulls before and after dividing by the calibration ``scale``, per label."""
    fig, axes = _grid(len(labels))
    for j, lab in enumerate(labels):
        series = {"val before": z_before[:, j], "val after": z_before[:, j] / scale[j]}
        if z_test is not None:
            series["test after"] = z_test[:, j] / scale[j]
        _pull_panel(axes[j], series, f"{lab} (scale {scale[j]:.2f})")
    fig.suptitle(title)
    return fig


def pulls_figure(pulls: Mapping[str, np.ndarray], title: str) -> Figure:
    """One pull histogram against N(0, 1) per label (e.g. repeat-pair pulls)."""
    labels = list(pulls)
    fig, axes = _grid(len(labels))
    for j, lab in enumerate(labels):
        _pull_panel(axes[j], {"pairs": pulls[lab]}, lab)
    fig.suptitle(title)
    return fig


def distribution_figure(
    label: str, pred: np.ndarray, reference: np.ndarray | None = None, title: str | None = None
) -> Figure:
    """Histogram of the predicted values of one label (and of the reference values when given)."""
    fig = Figure(figsize=(5.0, 3.6), layout="constrained")
    ax = fig.subplots()
    p = np.asarray(pred, dtype=float)
    p = p[np.isfinite(p)]
    r = None if reference is None else np.asarray(reference, dtype=float)
    r = None if r is None else r[np.isfinite(r)]
    both = np.concatenate([p, r]) if r is not None and r.size else p
    if both.size:
        lo, hi = np.percentile(both, [0.5, 99.5])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 40)
        ax.hist(np.clip(p, lo, hi), bins=bins, histtype="step", lw=1.5, label=f"predicted (n={p.size})")
        if r is not None and r.size:
            ax.hist(np.clip(r, lo, hi), bins=bins, histtype="step", lw=1.5, label=f"reference (n={r.size})")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(label)
    ax.set_ylabel("spectra")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{label}: distribution")
    return fig
