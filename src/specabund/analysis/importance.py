"""Feature importance of a trained network: integrated gradients cross-checked with occlusion.

What is attributed
    The network's predicted **mean** of one label in physical units (dex, K), for a single model or the
    mean over the members of an ensemble, with the network in eval mode (batch norm uses its running
    statistics, dropout is off). Attributions are with respect to the flux channel of the network input
    (``flux - 1`` after :func:`~specabund.training.data.prepare_input`, i.e. after the bad-pixel
    replacement and clipping); the uncertainty channel of two-channel models is held at the spectrum's
    own value along the whole path, so baseline and spectrum have consistent inverse variances and only
    the flux changes. Pixels without data are already at the continuum and get zero attribution.

Integrated gradients (captum)
    Baseline: a flat continuum, flux = 1. The attributions of a spectrum sum to ``F(x) - F(baseline)``
    (completeness); captum's convergence delta measures the violation and is recorded.

Occlusion (captum)
    Windows of ``occlusion_window`` pixels, moved by ``occlusion_stride``, replaced by the continuum
    (flux = 1); a pixel's value is the mean change of the prediction over the windows covering it.

Both are averaged over the analysed spectra as mean absolute attribution per pixel, with the standard
deviation across spectra as the spread. The statistics are kept as running sums
(:class:`AttributionStats`), so batches can be computed separately (and resumed) and merged exactly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients, Occlusion
from matplotlib.figure import Figure
from scipy.ndimage import uniform_filter1d
from scipy.signal import find_peaks, peak_widths
from torch import nn

from ..elements import element_of_label
from ..errors import ConfigError, DataMismatchError
from ..lines import load_linelist
from ..training.data import prepare_input
from ..training.saved import LoadedEnsemble, LoadedModel
from ..utils import atomic_savez
from .explain import feature_extents, format_lines, lines_in_region, telluric_note

logger = logging.getLogger(__name__)

__all__ = [
    "AttributionStats",
    "ImportanceSettings",
    "LabelMean",
    "attribute_batch",
    "importance_figure",
    "integrated_gradients",
    "occlusion",
    "top_regions",
]

REGION_COLUMNS = ("rank", "wave_start", "wave_end", "importance", "lines")


@dataclass
class ImportanceSettings:
    """Settings of the feature-importance analysis (the ``[analysis]`` config section).

    Parameters
    ----------
    ig_steps : int
        Integration steps of integrated gradients (Gauss-Legendre).
    ig_internal_batch : int
        Rows per forward/backward pass inside integrated gradients.
    occlusion_window, occlusion_stride : int
        Occlusion window and step (pixels).
    occlusion_per_batch : int
        Spectra of each analysis batch that are also occluded (0 disables occlusion; occlusion costs
        ``pixels / stride`` forward passes per spectrum).
    top_n_regions : int
        Number of regions listed.
    smooth_pixels : int
        Boxcar (pixels) applied to the importance spectrum before locating regions.
    max_region_half_width : float
        Cap (A) on the half-width of a region.
    own_line_half_width : float
        Half-width (A) around a line within which a pixel belongs to it.
    """

    ig_steps: int = 64
    ig_internal_batch: int = 512
    occlusion_window: int = 9
    occlusion_stride: int = 3
    occlusion_per_batch: int = 8
    top_n_regions: int = 10
    smooth_pixels: int = 5
    max_region_half_width: float = 15.0
    own_line_half_width: float = 3.0

    def __post_init__(self) -> None:
        for key in ("ig_steps", "ig_internal_batch", "occlusion_window", "occlusion_stride", "top_n_regions"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"analysis.{key} must be >= 1, got {getattr(self, key)}")
        if self.occlusion_stride > self.occlusion_window:
            raise ConfigError(
                f"analysis.occlusion_stride ({self.occlusion_stride}) must not exceed occlusion_window "
                f"({self.occlusion_window}): pixels between windows would never be occluded"
            )
        if self.occlusion_per_batch < 0 or self.smooth_pixels < 1:
            raise ConfigError("analysis.occlusion_per_batch must be >= 0 and smooth_pixels >= 1")
        if self.max_region_half_width <= 0 or self.own_line_half_width <= 0:
            raise ConfigError("analysis.max_region_half_width and own_line_half_width must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> ImportanceSettings:
        """Take the keys of ``data`` that are settings (others, like ``analysis_batch_size``, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class LabelMean(nn.Module):
    """The predicted mean of one label in physical units, as a function of the flux channel.

    ``forward(flux_channel, extra)`` with ``flux_channel`` ``(B, P)`` (``flux - 1``) and ``extra``
    ``(B, C - 1, P)`` (the uncertainty channel) or ``None``; returns ``(B,)``. For an ensemble, the mean over
    members. Every member is put in eval mode.

    Parameters
    ----------
    model : LoadedModel or LoadedEnsemble
        The trained network(s).
    label : str
        Which output.
    """

    def __init__(self, model: LoadedModel | LoadedEnsemble, label: str) -> None:
        super().__init__()
        members = model.members if isinstance(model, LoadedEnsemble) else [model]
        if label not in model.labels:
            raise DataMismatchError(
                f"model {model.run_dir} does not predict {label!r} (labels: {model.labels})"
            )
        self.index = model.labels.index(label)
        self.nets = nn.ModuleList([m.model for m in members])
        self.scale = [float(m.scaler.std[self.index]) for m in members]
        self.offset = [float(m.scaler.mean[self.index]) for m in members]
        self.in_channels = int(members[0].model_config.in_channels)
        self.device = members[0].device
        self.eval()

    def train(self, mode: bool = True) -> LabelMean:
        """Always eval: attribution is of the prediction (batch-norm running stats, no dropout)."""
        return super().train(False)

    def forward(self, flux_channel: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        x = flux_channel.unsqueeze(1)
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        out = None
        for net, s, o in zip(self.nets, self.scale, self.offset, strict=True):
            mu = net(x)[0][:, self.index] * s + o
            out = mu if out is None else out + mu
        assert out is not None
        return out / len(self.nets)

    def inputs(self, X: np.ndarray, ivar: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flux channel ``(B, P)`` and extra channels ``(B, C-1, P)`` (or ``None``) on the model device."""
        xb = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(self.device)
        vb = torch.from_numpy(np.ascontiguousarray(ivar, dtype=np.float32)).to(self.device)
        inp = prepare_input(xb, vb, self.in_channels)
        extra = inp[:, 1:, :].contiguous() if self.in_channels > 1 else None
        return inp[:, 0, :].contiguous(), extra


def _check_eval(module: nn.Module) -> None:
    training = [n for n, m in module.named_modules() if m.training]
    if training:
        raise RuntimeError(f"modules in training mode during attribution: {training[:5]}")


def integrated_gradients(
    fn: LabelMean, X: np.ndarray, ivar: np.ndarray, n_steps: int = 64, internal_batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrated gradients of ``fn`` from the flat continuum (flux = 1) to each spectrum.

    Returns
    -------
    attributions : ndarray
        ``(N, P)`` per-pixel attributions in label units.
    delta : ndarray
        ``(N,)`` captum convergence delta, ``sum(attributions) - (F(x) - F(baseline))``.
    output_diff : ndarray
        ``(N,)`` ``F(x) - F(baseline)``.
    """
    fn.eval()
    _check_eval(fn)
    flux, extra = fn.inputs(X, ivar)
    base = torch.zeros_like(flux)
    ig = IntegratedGradients(fn)
    with torch.enable_grad():
        attr, delta = ig.attribute(
            flux,
            baselines=base,
            additional_forward_args=(extra,),
            n_steps=int(n_steps),
            method="gausslegendre",
            internal_batch_size=int(internal_batch_size),
            return_convergence_delta=True,
        )
    attr_np = attr.detach().double().cpu().numpy()
    delta_np = delta.detach().double().cpu().numpy()
    # captum's delta is sum(attr) - (F(x) - F(baseline)), so the output difference follows without
    # another forward pass
    return attr_np, delta_np, attr_np.sum(axis=1) - delta_np


def occlusion(
    fn: LabelMean, X: np.ndarray, ivar: np.ndarray, window: int = 9, stride: int = 3, per_eval: int = 64
) -> np.ndarray:
    """Occlusion: ``F(x) - F(x with a window set to the continuum)``, averaged over covering windows.

    Returns ``(N, P)`` in label units.
    """
    fn.eval()
    _check_eval(fn)
    flux, extra = fn.inputs(X, ivar)
    occ = Occlusion(fn)
    with torch.no_grad():
        attr = occ.attribute(
            flux,
            sliding_window_shapes=(int(window),),
            strides=(int(stride),),
            baselines=0.0,
            additional_forward_args=(extra,),
            perturbations_per_eval=int(per_eval),
        )
    return attr.detach().double().cpu().numpy()


@dataclass
class AttributionStats:
    """Running sums of attributions over spectra (mergeable across batches).

    ``ig_*`` sums are over the spectra with integrated gradients, ``occ_*`` over the occluded ones.
    """

    n_pixels: int
    n_ig: int = 0
    ig_abs_sum: np.ndarray | None = None
    ig_abs_sq: np.ndarray | None = None
    ig_sum: np.ndarray | None = None
    n_occ: int = 0
    occ_abs_sum: np.ndarray | None = None
    occ_abs_sq: np.ndarray | None = None
    delta_abs_sum: float = 0.0
    delta_abs_max: float = 0.0
    diff_abs_sum: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ig_abs_sum", "ig_abs_sq", "ig_sum", "occ_abs_sum", "occ_abs_sq"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.n_pixels))

    def add(self, ig: np.ndarray, delta: np.ndarray, diff: np.ndarray, occ: np.ndarray | None = None) -> None:
        """Add the attributions of a batch of spectra."""
        a = np.abs(ig)
        self.n_ig += len(ig)
        self.ig_abs_sum = self.ig_abs_sum + a.sum(axis=0)
        self.ig_abs_sq = self.ig_abs_sq + (a**2).sum(axis=0)
        self.ig_sum = self.ig_sum + ig.sum(axis=0)
        self.delta_abs_sum += float(np.abs(delta).sum())
        self.delta_abs_max = max(self.delta_abs_max, float(np.abs(delta).max(initial=0.0)))
        self.diff_abs_sum += float(np.abs(diff).sum())
        if occ is not None and len(occ):
            o = np.abs(occ)
            self.n_occ += len(occ)
            self.occ_abs_sum = self.occ_abs_sum + o.sum(axis=0)
            self.occ_abs_sq = self.occ_abs_sq + (o**2).sum(axis=0)

    def merge(self, other: AttributionStats) -> AttributionStats:
        """A new object holding the sums of both."""
        if other.n_pixels != self.n_pixels:
            raise DataMismatchError("cannot merge attribution statistics of different grids")
        return AttributionStats(
            n_pixels=self.n_pixels,
            n_ig=self.n_ig + other.n_ig,
            ig_abs_sum=self.ig_abs_sum + other.ig_abs_sum,
            ig_abs_sq=self.ig_abs_sq + other.ig_abs_sq,
            ig_sum=self.ig_sum + other.ig_sum,
            n_occ=self.n_occ + other.n_occ,
            occ_abs_sum=self.occ_abs_sum + other.occ_abs_sum,
            occ_abs_sq=self.occ_abs_sq + other.occ_abs_sq,
            delta_abs_sum=self.delta_abs_sum + other.delta_abs_sum,
            delta_abs_max=max(self.delta_abs_max, other.delta_abs_max),
            diff_abs_sum=self.diff_abs_sum + other.diff_abs_sum,
        )

    @staticmethod
    def _mean_std(n: int, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if n == 0:
            nan = np.full(s1.shape, np.nan)
            return nan, nan
        m = s1 / n
        return m, np.sqrt(np.clip(s2 / n - m**2, 0.0, None))

    @property
    def importance(self) -> np.ndarray:
        """Mean |integrated gradients| per pixel."""
        return self._mean_std(self.n_ig, self.ig_abs_sum, self.ig_abs_sq)[0]

    @property
    def spread(self) -> np.ndarray:
        """Standard deviation of |integrated gradients| across spectra per pixel."""
        return self._mean_std(self.n_ig, self.ig_abs_sum, self.ig_abs_sq)[1]

    @property
    def signed(self) -> np.ndarray:
        """Mean signed integrated gradients per pixel."""
        return self.ig_sum / self.n_ig if self.n_ig else np.full(self.n_pixels, np.nan)

    @property
    def occlusion_importance(self) -> np.ndarray:
        return self._mean_std(self.n_occ, self.occ_abs_sum, self.occ_abs_sq)[0]

    @property
    def occlusion_spread(self) -> np.ndarray:
        return self._mean_std(self.n_occ, self.occ_abs_sum, self.occ_abs_sq)[1]

    @property
    def relative_delta(self) -> float:
        """Mean |convergence delta| over mean |F(x) - F(baseline)|."""
        return self.delta_abs_sum / self.diff_abs_sum if self.diff_abs_sum > 0 else float("nan")

    def save(self, path: str | Path) -> None:
        """Write the sums to an ``.npz`` (atomic)."""
        atomic_savez(
            path,
            n_pixels=np.array(self.n_pixels),
            n_ig=np.array(self.n_ig),
            ig_abs_sum=self.ig_abs_sum,
            ig_abs_sq=self.ig_abs_sq,
            ig_sum=self.ig_sum,
            n_occ=np.array(self.n_occ),
            occ_abs_sum=self.occ_abs_sum,
            occ_abs_sq=self.occ_abs_sq,
            delta_abs_sum=np.array(self.delta_abs_sum),
            delta_abs_max=np.array(self.delta_abs_max),
            diff_abs_sum=np.array(self.diff_abs_sum),
        )

    @classmethod
    def load(cls, path: str | Path) -> AttributionStats:
        with np.load(path, allow_pickle=False) as z:
            kw: dict[str, Any] = {}
            for f in fields(cls):
                v = z[f.name]
                kw[f.name] = v if v.ndim else v.item()
        return cls(**kw)


def attribute_batch(
    fn: LabelMean, X: np.ndarray, ivar: np.ndarray, settings: ImportanceSettings
) -> tuple[AttributionStats, np.ndarray]:
    """Integrated gradients of all spectra and occlusion of the first ``occlusion_per_batch``.

    Returns the statistics of the batch and the per-spectrum convergence delta.
    """
    ig, delta, diff = integrated_gradients(fn, X, ivar, settings.ig_steps, settings.ig_internal_batch)
    occ = None
    k = min(settings.occlusion_per_batch, len(X))
    if k > 0:
        occ = occlusion(fn, X[:k], ivar[:k], settings.occlusion_window, settings.occlusion_stride)
    stats = AttributionStats(n_pixels=X.shape[1])
    stats.add(ig, delta, diff, occ)
    return stats, delta


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    return uniform_filter1d(np.nan_to_num(np.asarray(x, dtype=float)), size=max(int(n), 1), mode="nearest")


def top_regions(
    wavelength: np.ndarray,
    importance: np.ndarray,
    top_n: int = 10,
    smooth_pixels: int = 5,
    max_half_width: float = 15.0,
    line_pad: float = 3.0,
    linelist: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The ``top_n`` most important wavelength regions with the known lines inside them.

    Regions are the peaks of the boxcar-smoothed importance; each extends to where the smoothed importance
    falls to half the peak (at most ``max_half_width`` A on each side, overlapping regions are merged).
    ``importance`` of a region is its share of the summed (unsmoothed) importance.

    Returns
    -------
    DataFrame
        Columns ``rank, wave_start, wave_end, importance, lines`` (vacuum A), sorted by rank; plus
        ``centre`` (A, the peak) as an extra column.
    """
    wl = np.asarray(wavelength, dtype=float)
    imp = np.clip(np.nan_to_num(np.asarray(importance, dtype=float)), 0.0, None)
    total = imp.sum()
    cols = [*REGION_COLUMNS, "centre"]
    if total <= 0 or wl.size < 3:
        return pd.DataFrame({c: [] for c in cols})
    sm = _smooth(imp, smooth_pixels)
    padded = np.concatenate([[0.0], sm, [0.0]])  # so that peaks at the edges are found too
    peaks_p, _ = find_peaks(padded)
    if peaks_p.size == 0:
        peaks_p = np.array([int(np.argmax(sm)) + 1])
    _, _, left, right = peak_widths(padded, peaks_p, rel_height=0.5)
    peaks, left, right = peaks_p - 1, left - 1, right - 1
    dwl = np.gradient(wl)
    regions: list[tuple[int, int, int]] = []
    for p, lft, rgt in sorted(zip(peaks, left, right, strict=True), key=lambda t: -sm[t[0]]):
        i0 = int(np.floor(lft))
        i1 = int(np.ceil(rgt))
        i0 = max(i0, int(np.searchsorted(wl, wl[p] - max_half_width)), 0)
        i1 = min(i1, int(np.searchsorted(wl, wl[p] + max_half_width, side="right")) - 1, wl.size - 1)
        merged = False
        for j, (q, a, b) in enumerate(regions):
            if i0 <= b and i1 >= a:
                regions[j] = (q, min(a, i0), max(b, i1))
                merged = True
                break
        if not merged:
            regions.append((int(p), i0, i1))
        if len(regions) >= 4 * top_n:
            break
    if linelist is None:
        linelist = load_linelist()
    ll = linelist[(linelist["wavelength"] > wl[0] - 100) & (linelist["wavelength"] < wl[-1] + 100)]
    ll = ll.reset_index(drop=True)
    rows = []
    for p, a, b in regions:
        frac = float(imp[a : b + 1].sum() / total)
        w0, w1 = float(wl[a] - 0.5 * dwl[a]), float(wl[b] + 0.5 * dwl[b])
        lines = lines_in_region(w0, w1, wl[p], ll, line_pad)
        tell = telluric_note(w0, w1)
        rows.append(
            {
                "wave_start": w0,
                "wave_end": w1,
                "importance": frac,
                "lines": f"{tell} {format_lines(lines)}" if tell else format_lines(lines),
                "centre": float(wl[p]),
            }
        )
    df = pd.DataFrame(rows).sort_values("importance", ascending=False).head(top_n).reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df[cols]


def importance_figure(
    wavelength: np.ndarray,
    stats: AttributionStats,
    label: str,
    regions: pd.DataFrame,
    title: str | None = None,
) -> Figure:
    """Importance spectrum (mean |IG| with its spread), occlusion profile, top regions and known lines.

    Lines of the label's own element are drawn in red and named; the nearest line of each top region is
    named too.
    """
    wl = np.asarray(wavelength, dtype=float)
    fig = Figure(figsize=(13, 6.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1.0))
    imp, spread = stats.importance, stats.spread
    ax.fill_between(wl, np.clip(imp - spread, 0, None), imp + spread, color="C0", alpha=0.2, lw=0,
                    label="+-1 std across spectra")  # fmt: skip
    ax.plot(wl, imp, color="C0", lw=0.8, label=f"mean |integrated gradients| ({stats.n_ig} spectra)")
    ymax = float(np.nanmax(imp + spread)) if np.isfinite(imp).any() else 1.0
    ax.set_ylim(0, ymax * 1.25 if ymax > 0 else 1.0)
    for r in regions.itertuples(index=False):
        for a in (ax, ax2):
            a.axvspan(r.wave_start, r.wave_end, color="orange", alpha=0.25, lw=0)
        ax.text((r.wave_start + r.wave_end) / 2, ymax * 1.02, str(int(r.rank)), ha="center", va="bottom",
                fontsize=7, color="darkorange")  # fmt: skip
    element = element_of_label(label)
    if element is not None:
        own = load_linelist(elements=[element])
        own = own[(own["wavelength"] >= wl[0]) & (own["wavelength"] <= wl[-1])]
        lo, hi = feature_extents(own, 0.0)
        for k, row in enumerate(own.itertuples(index=False)):
            if row.kind == "molecular_band":
                ax.axvspan(lo[k], hi[k], color="red", alpha=0.06, lw=0)
            ax.axvline(row.wavelength, color="red", lw=0.6, alpha=0.6)
            ax.text(row.wavelength, ymax * 1.12, row.species, rotation=90, fontsize=6, color="red",
                    ha="center", va="bottom", clip_on=True)  # fmt: skip
    for r in regions.itertuples(index=False):
        first = str(r.lines).split(";")[0].strip()
        if first and not first.startswith("none"):
            ax.text((r.wave_start + r.wave_end) / 2, ymax * 0.92, first.replace(" (band head)", ""),
                    rotation=90, fontsize=6, ha="center", va="top", color="0.25")  # fmt: skip
    ax.set_ylabel(f"|attribution| ({label} units / pixel)")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title or f"{label}: feature importance (integrated gradients, baseline = flat continuum)")
    if stats.n_occ:
        occ, ospread = stats.occlusion_importance, stats.occlusion_spread
        ax2.fill_between(wl, np.clip(occ - ospread, 0, None), occ + ospread, color="C2", alpha=0.2, lw=0)
        ax2.plot(wl, occ, color="C2", lw=0.8, label=f"occlusion, mean |change| ({stats.n_occ} spectra)")
        ax2.legend(loc="upper right", fontsize=7)
    else:
        ax2.text(0.5, 0.5, "occlusion not computed", transform=ax2.transAxes, ha="center", va="center")
    ax2.set_ylabel(f"|occlusion| ({label})")
    ax2.set_xlabel("vacuum wavelength (A)")
    for a in (ax, ax2):
        a.grid(alpha=0.25)
        a.set_xlim(wl[0], wl[-1])
    return fig


def agreement(
    wavelength: np.ndarray, stats: AttributionStats, settings: ImportanceSettings
) -> dict[str, float]:
    """Cross-check of integrated gradients and occlusion.

    ``ig_occlusion_spearman``: rank correlation of the two importance profiles after smoothing the IG
    profile over the occlusion window; ``top_region_overlap``: fraction of the IG top regions whose peak is
    within a top region of the occlusion profile. NaN without occlusion.
    """
    nan = float("nan")
    if stats.n_occ == 0:
        return {"ig_occlusion_spearman": nan, "top_region_overlap": nan}
    ig = _smooth(stats.importance, settings.occlusion_window)
    occ = stats.occlusion_importance
    rho = float(pd.Series(ig).corr(pd.Series(occ), method="spearman"))
    kw = {
        "top_n": settings.top_n_regions,
        "smooth_pixels": settings.smooth_pixels,
        "max_half_width": settings.max_region_half_width,
        "line_pad": settings.own_line_half_width,
        "linelist": load_linelist().head(0),
    }
    r_ig = top_regions(wavelength, stats.importance, **kw)
    r_occ = top_regions(wavelength, occ, **kw)
    if r_ig.empty or r_occ.empty:
        return {"ig_occlusion_spearman": rho, "top_region_overlap": nan}
    hit = [
        bool(((r_occ["wave_start"] <= c) & (c <= r_occ["wave_end"])).any()) for c in r_ig["centre"].to_numpy()
    ]
    return {"ig_occlusion_spearman": rho, "top_region_overlap": float(np.mean(hit))}
