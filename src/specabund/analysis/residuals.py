"""Residual analysis of one label: metrics, a multi-panel figure and a text report.

Residual = predicted - true. The figure shows true vs predicted, the residual histogram (with the Gaussian
of the robust scatter), a normal QQ plot of the residuals, and the residuals against the label itself,
SNR, Teff and logg (each with a running median and 16-84 percentile band), plus the predicted uncertainty
against the absolute residual.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from ..dataset import Dataset
from ..metrics import DEFAULT_SNR_BINS, metrics_by_snr, regression_metrics, robust_scatter

__all__ = [
    "PREDICTION_COLUMNS",
    "prediction_frame",
    "residual_figure",
    "residual_metrics",
    "residual_report_text",
]

PREDICTION_COLUMNS = (
    "spec", "obsid", "filename", "true", "pred", "sigma", "residual", "snr", "teff", "logg", "fe_h",
)  # fmt: skip


def prediction_frame(
    dataset: Dataset, label: str, pred: np.ndarray, sigma: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per spectrum: identifiers, true and predicted value, residual and stellar parameters.

    Parameters
    ----------
    dataset : Dataset
        The spectra (``label`` must be one of ``dataset.elements``).
    label : str
        Label analysed.
    pred, sigma : ndarray
        ``(N,)`` predictions and predicted uncertainties (NaN when unknown).
    """
    true = dataset.y[:, dataset.label_index(label)].astype(np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    sig = np.full(pred.shape, np.nan) if sigma is None else np.asarray(sigma, dtype=np.float64)
    return pd.DataFrame(
        {
            "spec": dataset.spec.astype(str),
            "obsid": dataset.obsid.astype(str),
            "filename": dataset.filenames.astype(str),
            "true": true,
            "pred": pred,
            "sigma": sig,
            "residual": pred - true,
            "snr": dataset.snr.astype(np.float64),
            "teff": dataset.teff.astype(np.float64),
            "logg": dataset.logg.astype(np.float64),
            "fe_h": dataset.fe_h.astype(np.float64),
        }
    )


def residual_metrics(df: pd.DataFrame) -> dict[str, float]:
    """RMSE, MAE, bias, robust scatter, R2, n of ``df`` (a :func:`prediction_frame`), plus uncertainty
    calibration: ``z_std`` (robust scatter of residual / sigma) and ``frac_within_1sigma``."""
    m: dict[str, Any] = regression_metrics(df["true"].to_numpy(), df["pred"].to_numpy())
    ok = np.isfinite(df["residual"]) & np.isfinite(df["sigma"]) & (df["sigma"] > 0)
    if ok.any():
        z = (df["residual"][ok] / df["sigma"][ok]).to_numpy()
        m["z_robust_std"] = robust_scatter(z)
        m["frac_within_1sigma"] = float(np.mean(np.abs(z) <= 1.0))
    else:
        m["z_robust_std"] = float("nan")
        m["frac_within_1sigma"] = float("nan")
    return m


def _running(x: np.ndarray, y: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, ...]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 * n_bins:
        n_bins = max(x.size // 5, 1)
    if x.size == 0:
        e = np.array([])
        return e, e, e, e
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)))
    xc, med, lo, hi = [], [], [], []
    for a, b in itertools.pairwise(edges):
        sel = (x >= a) & (x <= b)
        if sel.sum() < 3:
            continue
        xc.append(np.median(x[sel]))
        med.append(np.median(y[sel]))
        lo.append(np.percentile(y[sel], 16))
        hi.append(np.percentile(y[sel], 84))
    return np.array(xc), np.array(med), np.array(lo), np.array(hi)


def _vs(ax: Any, x: np.ndarray, r: np.ndarray, xlabel: str, log: bool = False) -> None:
    ok = np.isfinite(x) & np.isfinite(r)
    if not ok.any():
        ax.text(0.5, 0.5, f"no {xlabel}", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel(xlabel)
        return
    ax.scatter(x[ok], r[ok], s=4, alpha=0.4, color="C0", lw=0)
    xc, med, lo, hi = _running(x[ok], r[ok])
    if xc.size:
        ax.plot(xc, med, color="C3", lw=1.2, label="running median")
        ax.fill_between(xc, lo, hi, color="C3", alpha=0.15, lw=0, label="16-84%")
    ax.axhline(0, color="k", lw=0.7)
    if log and np.nanmin(x[ok]) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("residual (pred - true)")
    ax.grid(alpha=0.3)


def residual_figure(df: pd.DataFrame, label: str, title: str | None = None) -> Figure:
    """The residual-analysis figure of one label (see module docstring)."""
    fig = Figure(figsize=(14, 10), layout="constrained")
    axes = fig.subplots(3, 3).ravel()
    t, p, r = (df[c].to_numpy(dtype=float) for c in ("true", "pred", "residual"))
    ok = np.isfinite(t) & np.isfinite(p)
    m = residual_metrics(df)
    ax = axes[0]
    if ok.any():
        ax.scatter(t[ok], p[ok], s=5, alpha=0.5, lw=0)
        lo, hi = float(min(t[ok].min(), p[ok].min())), float(max(t[ok].max(), p[ok].max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.text(
        0.03, 0.97,
        f"n = {m['n']}\nRMSE = {m['rmse']:.4g}\nMAE = {m['mae']:.4g}\nbias = {m['bias']:+.4g}\n"
        f"robust scatter = {m['robust_scatter']:.4g}\nR2 = {m['r2']:.3f}",
        transform=ax.transAxes, va="top", fontsize=8, bbox={"fc": "w", "alpha": 0.8, "lw": 0},
    )  # fmt: skip
    ax.grid(alpha=0.3)
    ax = axes[1]
    rr = r[np.isfinite(r)]
    if rr.size:
        ax.hist(rr, bins=min(40, max(rr.size // 4, 5)), density=True, color="C0", alpha=0.7)
        s = m["robust_scatter"]
        if np.isfinite(s) and s > 0:
            xs = np.linspace(rr.min(), rr.max(), 200)
            ax.plot(xs, stats.norm.pdf(xs, np.median(rr), s), "C3", lw=1.2, label="Gaussian, robust scatter")
            ax.legend(fontsize=7)
    ax.set_xlabel("residual (pred - true)")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax = axes[2]
    if rr.size >= 3:
        (osm, osr), (slope, icpt, _) = stats.probplot(rr, dist="norm")
        ax.scatter(osm, osr, s=5, lw=0)
        ax.plot(osm, slope * osm + icpt, "C3", lw=1)
    ax.set_xlabel("normal quantile")
    ax.set_ylabel("residual quantile")
    ax.set_title("QQ plot", fontsize=9)
    ax.grid(alpha=0.3)
    _vs(axes[3], t, r, f"true {label}")
    _vs(axes[4], df["snr"].to_numpy(dtype=float), r, "SNR", log=True)
    _vs(axes[5], df["teff"].to_numpy(dtype=float), r, "Teff (K)")
    _vs(axes[6], df["logg"].to_numpy(dtype=float), r, "logg")
    _vs(axes[7], df["fe_h"].to_numpy(dtype=float), r, "[Fe/H]")
    ax = axes[8]
    sig = df["sigma"].to_numpy(dtype=float)
    oks = np.isfinite(sig) & np.isfinite(r)
    if oks.any():
        ax.scatter(sig[oks], np.abs(r[oks]), s=5, alpha=0.5, lw=0)
        top = float(max(sig[oks].max(), np.abs(r[oks]).max()))
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="|residual| = sigma")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no predicted uncertainty", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("predicted sigma")
    ax.set_ylabel("|residual|")
    ax.grid(alpha=0.3)
    fig.suptitle(title or f"{label}: residual analysis")
    return fig


def residual_report_text(
    df: pd.DataFrame,
    label: str,
    title: str | None = None,
    snr_bins: Sequence[float] = DEFAULT_SNR_BINS,
    notes: Sequence[str] = (),
) -> str:
    """Plain-text report: overall metrics, metrics per SNR bin, trends of the residual with the stellar
    parameters (Spearman rank correlation) and the worst outliers."""
    m = residual_metrics(df)
    lines = [title or f"{label}: residual analysis", ""]
    lines.append(f"spectra with a true value and a prediction: {m['n']} (of {len(df)})")
    lines.append(f"RMSE            {m['rmse']:.5g}")
    lines.append(f"MAE             {m['mae']:.5g}")
    lines.append(f"bias            {m['bias']:+.5g}   (mean of pred - true)")
    lines.append(f"robust scatter  {m['robust_scatter']:.5g}   (1.4826 MAD of the residuals)")
    lines.append(f"R2              {m['r2']:.5g}")
    if np.isfinite(m["z_robust_std"]):
        lines.append(
            "uncertainty calibration: robust std of residual/sigma = "
            f"{m['z_robust_std']:.3g} (1 = calibrated), {m['frac_within_1sigma']:.1%} within 1 sigma "
            "(68% expected)"
        )
    lines.append("")
    lines.append("By SNR:")
    by = metrics_by_snr(df["true"].to_numpy(), df["pred"].to_numpy(), df["snr"].to_numpy(), tuple(snr_bins))
    lines.append(f"  {'bin':<10}{'n':>6}{'rmse':>10}{'bias':>10}{'scatter':>10}")
    for name, mm in by.items():
        lines.append(
            f"  {name:<10}{mm['n']:>6}{mm['rmse']:>10.4g}{mm['bias']:>+10.3g}{mm['robust_scatter']:>10.4g}"
        )
    lines.append("")
    lines.append("Trend of the residual with (Spearman rank correlation; |rho| > 0.2 flags a systematic):")
    r = df["residual"].to_numpy(dtype=float)
    for col, name in (
        ("true", label),
        ("snr", "SNR"),
        ("teff", "Teff"),
        ("logg", "logg"),
        ("fe_h", "[Fe/H]"),
    ):
        x = df[col].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(r)
        if ok.sum() < 5 or np.ptp(x[ok]) == 0:
            lines.append(f"  {name:<8} (not enough values)")
            continue
        rho = float(stats.spearmanr(x[ok], r[ok]).statistic)
        flag = "  <- systematic" if abs(rho) > 0.2 else ""
        lines.append(f"  {name:<8} rho = {rho:+.3f}{flag}")
    ok = np.isfinite(r)
    if ok.any():
        lines.append("")
        lines.append("Largest |residuals|:")
        worst = df[ok].reindex(df[ok]["residual"].abs().sort_values(ascending=False).index).head(5)
        for w in worst.itertuples(index=False):
            lines.append(
                f"  {w.spec:<24} true {w.true:+.3f} pred {w.pred:+.3f} "
                f"residual {w.residual:+.3f} snr {w.snr:.0f}"
            )
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"
