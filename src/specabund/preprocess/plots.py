"""Plots of the preprocessing of one spectrum (kept apart from the numerical steps)."""

from __future__ import annotations

from typing import Any

from .steps import C_KMS, PreprocessResult

#: Strong lines and bands for plots (vacuum Angstrom; air values converted with Morton 2000).
STRONG_LINES: dict[str, float] = {
    "Ca II K": 3934.78,
    "Ca II H": 3969.59,
    "H delta": 4102.89,
    "G band": 4305.6,
    "H gamma": 4341.68,
    "H beta": 4862.68,
    "Mg b": 5174.1,
    "Na D": 5894.6,
    "H alpha": 6564.61,
    "Ca II 8500": 8500.35,
    "Ca II 8544": 8544.44,
    "Ca II 8664": 8664.52,
}


# -------------------------------------------------------------------------------------------------- plot


def plot_stages(result: PreprocessResult, linelist: dict[str, float] | None = None) -> Any:
    """Figure with one panel per kept stage and the main absorption lines marked.

    Parameters
    ----------
    result : PreprocessResult
        From ``preprocess_spectrum(..., keep_stages=True)``.
    linelist : dict, optional
        ``{label: rest vacuum wavelength}``; default :data:`STRONG_LINES`. Lines are drawn at rest
        wavelength on grid panels and at ``lambda (1 + v/c)`` on the observed-frame panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if result.stages is None:
        raise ValueError("result has no stages: call preprocess_spectrum(..., keep_stages=True)")
    lines = STRONG_LINES if linelist is None else linelist
    st = result.stages
    fig = Figure(figsize=(11, 10), layout="constrained")
    axes = fig.subplots(4, 1)
    zf = 1.0 + result.rv_used_kms / C_KMS

    ax = axes[0]
    ax.plot(*st["raw"], color="0.6", lw=0.6, label="raw")
    ax.plot(*st["cleaned"], color="C0", lw=0.6, label="cleaned")
    ax.set_title(f"observed frame (RV {result.rv_used_kms:.1f} km/s from {result.rv_source})", fontsize=9)
    ax = axes[1]
    ax.plot(*st["rest_resampled"], color="C0", lw=0.6, label="rest frame, resampled")
    ax.plot(*st["continuum"], color="C3", lw=1.0, label="continuum")
    ax.set_title("rest frame on the common grid", fontsize=9)
    ax = axes[2]
    ax.plot(*st["normalised"], color="k", lw=0.5, label="normalised")
    ax.axhline(1.0, color="C3", lw=0.6)
    ax.set_ylim(-0.1, 1.6)
    ax.set_title(
        f"normalised; status {result.status}, SNR {result.snr_measured:.1f}, good {result.good_fraction:.2f}",
        fontsize=9,
    )
    ax = axes[3]
    gw, gf = st["normalised"]
    sel = (gw > 5100) & (gw < 5300)
    ax.plot(gw[sel], gf[sel], color="k", lw=0.8, drawstyle="steps-mid")
    ax.set_title("normalised, zoom on Mg b", fontsize=9)
    for i, ax in enumerate(axes):
        lo, hi = ax.get_xlim()
        scale = zf if i == 0 else 1.0
        for name, lam in lines.items():
            x = lam * scale
            if lo <= x <= hi:
                ax.axvline(x, color="C2", lw=0.5, ls=":")
                ax.text(
                    x,
                    1.0,
                    name,
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=6,
                    transform=ax.get_xaxis_transform(),
                )
        ax.set_xlabel("wavelength [A, vacuum]")
        ax.legend(loc="lower right", fontsize=7) if ax.get_legend_handles_labels()[0] else None
    return fig
