"""Step 5: the continuum: iterative penalised-spline fit with masks, and normalisation."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.interpolate import BSpline
from scipy.linalg.lapack import dpbsv as _dpbsv
from scipy.special import ndtr

from ...errors import SpecabundError
from ..options import PreprocessOptions

#: Rest-frame intervals (vacuum A) excluded from the continuum fit: Balmer lines with their wings, Ca H&K,
#: the G band, Mg b, Na D and the Ca triplet, the features that are strong in FGK stars at R ~ 1800.
CONTINUUM_LINE_MASK: tuple[tuple[float, float], ...] = (
    (3922.0, 3947.0),  # Ca II K
    (3957.0, 3984.0),  # Ca II H + H epsilon
    (4083.0, 4123.0),  # H delta
    (4295.0, 4318.0),  # G band (CH)
    (4322.0, 4362.0),  # H gamma
    (4838.0, 4888.0),  # H beta
    (5160.0, 5195.0),  # Mg b triplet
    (5884.0, 5905.0),  # Na D
    (6540.0, 6590.0),  # H alpha
    (8490.0, 8511.0),  # Ca II triplet
    (8534.0, 8555.0),
    (8654.0, 8675.0),
)

#: Observed-frame (telluric) intervals excluded from the continuum fit: the O2 B and A bands (vacuum A).
TELLURIC_MASK: tuple[tuple[float, float], ...] = (
    (6866.0, 6925.0),
    (7592.0, 7702.0),
)


class ContinuumError(SpecabundError):
    """The continuum fit failed; ``reason`` says why (it becomes the status 'continuum_failed: reason')."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# ------------------------------------------------------------------------------------------ 5. continuum


@dataclass(frozen=True)
class _SplineBasis:
    """Cubic B-spline basis on a fixed, sorted wavelength array, arranged for fast banded normal equations.

    Pixels are sorted, so the first non-zero coefficient index ``k0`` of each pixel is non-decreasing and
    pixels sharing ``k0`` form contiguous runs: every normal-equation sum is one ``np.add.reduceat`` over
    those runs followed by a tiny ``bincount`` onto the band storage.
    """

    design: Any  # scipy.sparse CSR design matrix (n, m), for fast evaluation
    vals: np.ndarray  # (n, 4) non-zero basis values per pixel
    idx4: np.ndarray  # (n, 4) their coefficient indices
    pairs: np.ndarray  # (n, 10) products vals[:, a] * vals[:, b] for a <= b
    pairs_t: np.ndarray  # (10, n) contiguous transpose of pairs
    vals_t: np.ndarray  # (4, n) contiguous transpose of vals
    pair_d: np.ndarray  # (10,) b - a of each pair
    pair_b: np.ndarray  # (10,) b of each pair
    starts: np.ndarray  # first pixel of each run of equal k0
    band_flat: np.ndarray  # (runs * 10,) flat index into the (4, m) upper band storage
    rhs_flat: np.ndarray  # (runs * 4,) coefficient index of each run's 4 right-hand-side sums
    penalty_bands: np.ndarray  # (3, m): diagonals 0, 1, 2 of D2^T D2
    m: int


_PAIRS: tuple[tuple[int, int], ...] = tuple((a, b) for a in range(4) for b in range(a, 4))


def _knots(x0: float, x1: float, split: float, spacing_blue: float, spacing_red: float) -> np.ndarray:
    if split <= x0 or split >= x1:
        spacing = spacing_blue if split >= x1 else spacing_red
        nseg = max(1, math.ceil((x1 - x0) / spacing))
        breaks = np.linspace(x0, x1, nseg + 1)
    else:
        nb = max(1, math.ceil((split - x0) / spacing_blue))
        nr = max(1, math.ceil((x1 - split) / spacing_red))
        breaks = np.concatenate((np.linspace(x0, split, nb + 1), np.linspace(split, x1, nr + 1)[1:]))
    return np.concatenate(([x0] * 3, breaks, [x1] * 3))


@functools.lru_cache(maxsize=16)
def _spline_basis_cached(wave_bytes: bytes, split: float, sb: float, sr: float) -> _SplineBasis:
    wave = np.frombuffer(wave_bytes, dtype=np.float64)
    if wave.size < 2 or np.any(np.diff(wave) <= 0):
        raise ValueError("continuum wavelengths must be strictly increasing")
    t = _knots(float(wave[0]), float(wave[-1]), split, sb, sr)
    dm = BSpline.design_matrix(wave, t, 3).tocsr()
    n = wave.size
    m = len(t) - 4
    if dm.nnz != 4 * n:  # pragma: no cover - scipy always stores k+1 entries per row
        raise RuntimeError("unexpected B-spline design matrix layout")
    vals = np.ascontiguousarray(dm.data.reshape(n, 4))
    idx4 = np.ascontiguousarray(dm.indices.reshape(n, 4).astype(np.intp))
    k0 = idx4[:, 0]
    if np.any(np.diff(idx4, axis=1) != 1) or np.any(np.diff(k0) < 0):  # pragma: no cover
        raise RuntimeError("unexpected B-spline design matrix layout")
    pairs = np.stack([vals[:, a] * vals[:, b] for a, b in _PAIRS], axis=1)
    starts = np.flatnonzero(np.concatenate(([True], np.diff(k0) > 0)))
    k0_runs = k0[starts]
    # A[i, j] (i <= j) lives at ab[3 - (j - i), j] in LAPACK upper band storage
    band_flat = np.stack([(3 - (b - a)) * m + k0_runs + b for a, b in _PAIRS], axis=1).ravel()
    rhs_flat = (k0_runs[:, None] + np.arange(4)[None, :]).ravel()
    pen = np.zeros((3, m))
    if m >= 3:
        d2 = np.diff(np.eye(m), 2, axis=0)
        p = d2.T @ d2
        for d in range(3):
            pen[d, : m - d] = np.diagonal(p, d)
    for arr in (vals, idx4, pairs, starts, band_flat, rhs_flat, pen):
        arr.flags.writeable = False
    pair_b = np.array([b for _, b in _PAIRS], dtype=np.intp)
    pair_d = np.array([b - a for a, b in _PAIRS], dtype=np.intp)
    pairs_t = np.ascontiguousarray(pairs.T)
    vals_t = np.ascontiguousarray(vals.T)
    pairs_t.flags.writeable = False
    vals_t.flags.writeable = False
    return _SplineBasis(
        dm, vals, idx4, pairs, pairs_t, vals_t, pair_d, pair_b, starts, band_flat, rhs_flat, pen, m
    )


def _spline_basis(wave: np.ndarray, split: float, sb: float, sr: float) -> _SplineBasis:
    return _spline_basis_cached(np.ascontiguousarray(wave, dtype=np.float64).tobytes(), split, sb, sr)


def _normal_full(
    basis: _SplineBasis, w: np.ndarray, ys: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Data part of the banded normal matrix (4, m) and right-hand sides (len(ys), m) for weights ``w``."""
    m = basis.m
    k = len(ys)
    q = np.empty((10 + 4 * k, w.size))  # pixel axis last and contiguous: reduceat runs along memory
    np.multiply(basis.pairs_t, w, out=q[:10])
    for i, y in enumerate(ys):
        np.multiply(basis.vals_t, w * y, out=q[10 + 4 * i : 14 + 4 * i])
    runs = np.add.reduceat(q, basis.starts, axis=1)  # (10 + 4k, runs)
    ab = np.bincount(basis.band_flat, weights=runs[:10].T.ravel(), minlength=4 * m).reshape(4, m)
    rhs = np.empty((k, m))
    for i in range(k):
        rhs[i] = np.bincount(basis.rhs_flat, weights=runs[10 + 4 * i : 14 + 4 * i].T.ravel(), minlength=m)
    return ab, rhs


def _normal_delta(
    basis: _SplineBasis, pix: np.ndarray, dw: np.ndarray, ys: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Change of :func:`_normal_full` when the weights of pixels ``pix`` change by ``dw`` (few pixels)."""
    m = basis.m
    k0 = basis.idx4[pix, 0]
    flat = ((3 - basis.pair_d)[None, :] * m + k0[:, None] + basis.pair_b[None, :]).ravel()
    ab = np.bincount(flat, weights=(basis.pairs[pix] * dw[:, None]).ravel(), minlength=4 * m).reshape(4, m)
    rhs = np.empty((len(ys), m))
    cols = basis.idx4[pix].ravel()
    for i, y in enumerate(ys):
        rhs[i] = np.bincount(cols, weights=(basis.vals[pix] * (dw * y[pix])[:, None]).ravel(), minlength=m)
    return ab, rhs


def _pspline_solve(basis: _SplineBasis, ab_data: np.ndarray, rhs: np.ndarray, penalty: float) -> np.ndarray:
    """Coefficients minimising sum w (y - B c)^2 + lam |D2 c|^2 with lam = penalty * mean diagonal weight."""
    m = basis.m
    ab = ab_data.copy()
    lam = penalty * ab[3].sum() / m
    ab[3] += lam * basis.penalty_bands[0]
    ab[2, 1:] += lam * basis.penalty_bands[1, : m - 1]
    ab[1, 2:] += lam * basis.penalty_bands[2, : m - 2]
    _, coef, info = _dpbsv(ab, rhs, lower=0)
    if info != 0:
        raise ContinuumError(f"singular spline system (LAPACK dpbsv info={info})")
    return coef


def _evaluate(basis: _SplineBasis, coef: np.ndarray) -> np.ndarray:
    return np.asarray(basis.design @ coef)


def _interval_mask(
    wave: np.ndarray, intervals: tuple[tuple[float, float], ...], scale: float = 1.0
) -> np.ndarray:
    bounds = np.asarray(intervals, dtype=np.float64).ravel() * scale
    # inside an interval <=> an odd number of bounds lie at or below the wavelength
    return (np.searchsorted(bounds, wave, side="right") % 2) == 1


def continuum_mask(wave: np.ndarray, z: float = 0.0) -> np.ndarray:
    """Pixels of rest-frame ``wave`` inside :data:`CONTINUUM_LINE_MASK` or the shifted :data:`TELLURIC_MASK`.

    ``z`` is the redshift that was removed, so that observed-frame telluric bands land at ``band / (1+z)``.
    """
    wave = np.asarray(wave, dtype=np.float64)
    return _interval_mask(wave, CONTINUUM_LINE_MASK) | _interval_mask(wave, TELLURIC_MASK, 1.0 / (1.0 + z))


#: Clipping noise floor as a fraction of the continuum: residuals are clipped in units of
#: ``max(sigma, CONTINUUM_CLIP_FLOOR * continuum)``, so above an SNR of 1 / floor the set of pixels kept
#: (continuum plus lines too weak to clip) no longer depends on the SNR, and neither does the continuum.
CONTINUUM_CLIP_FLOOR: float = 0.1


def _truncated_mean(a: np.ndarray, b: float | np.ndarray) -> np.ndarray:
    """Mean of a standard normal truncated to [-a, b]: the offset asymmetric clipping gives to pure noise."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    phi_a = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    phi_b = np.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    return (phi_a - phi_b) / (ndtr(b) - ndtr(-a))


@functools.lru_cache(maxsize=16)
def _shift_table(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.linspace(1.0, 1.0 + 10.0 / min(lo, 1.0), 2001)
    m = _truncated_mean(lo * s, hi * s)
    s.flags.writeable = False
    m.flags.writeable = False
    return s, m


def _clip_shift(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``_truncated_mean(lo * s, hi * s)`` for ``s >= 1`` (interpolated; 0 beyond ~10 sigma)."""
    ts, tm = _shift_table(float(lo), float(hi))
    return np.interp(s, ts, tm, right=0.0)


#: A pixel whose continuum is below this many times its noise (``continuum * sqrt(ivar)``, the per-pixel
#: SNR the continuum level would have) carries no usable flux: the continuum step gives it ``ivar = 0``.
CONTINUUM_MIN_PIXEL_SNR: float = 1.0

#: Rest wavelength (A) up to which a blue arm without usable flux may be masked (LAMOST's dichroic).
BLUE_ARM_MAX_WAVE: float = 5700.0

_BLUE_BIN = 32  # grid pixels per bin of the blue-arm flux test (~30 A at 4000 A)
_BLUE_RUN = 3  # consecutive bins with usable flux that end a masked blue arm


def blue_arm_end(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> int:
    """Number of grid pixels at the blue end that carry no usable flux (0 when the blue arm is usable).

    The pixels below :data:`BLUE_ARM_MAX_WAVE` are cut into bins of 32; a bin with at least 8 good pixels
    has usable flux when its mean flux over its good pixels is at least :data:`CONTINUUM_MIN_PIXEL_SNR`
    times the r.m.s. noise of one pixel (the per-pixel SNR of the bin's pseudo-continuum; absorption lines
    included, so heavy line blanketing counts against it). The blue arm ends at the first bin that starts
    a run of three bins with usable flux (bins without data are skipped); everything bluer is without
    usable flux. When no such run exists the whole range below :data:`BLUE_ARM_MAX_WAVE` is. A mean and
    not a median: the test must not depend on the noise of single pixels (negative fluxes of a
    sky-dominated, or over-subtracted, blue arm pull the mean down as they should).

    Parameters
    ----------
    wave : ndarray
        Increasing rest-frame wavelengths (A) of the grid.
    flux, ivar : ndarray
        Flux and inverse variance on ``wave`` (``ivar <= 0`` or non-finite values: no data).

    Returns
    -------
    int
        Pixels ``[0, n)`` form the blue arm without usable flux.
    """
    wave = np.asarray(wave, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    data = (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux)
    nbins = int(np.searchsorted(wave, BLUE_ARM_MAX_WAVE)) // _BLUE_BIN
    if nbins == 0:
        return 0
    m = nbins * _BLUE_BIN
    d = data[:m].reshape(nbins, _BLUE_BIN)
    n = np.count_nonzero(d, axis=1)
    sf = np.where(d, flux[:m].reshape(nbins, _BLUE_BIN), 0.0).sum(axis=1)
    sv = np.divide(1.0, ivar[:m], out=np.zeros(m), where=data[:m]).reshape(nbins, _BLUE_BIN).sum(axis=1)
    defined = np.flatnonzero(n >= _BLUE_BIN // 4)
    if defined.size == 0:
        return 0
    # mean flux / rms pixel noise = (sf / n) / sqrt(sv / n)
    bad = sf[defined] < CONTINUUM_MIN_PIXEL_SNR * np.sqrt(n[defined] * sv[defined])
    if not bad[0]:
        return 0
    cs = np.concatenate(([0], np.cumsum(bad)))
    j = np.arange(defined.size)
    clean_run = cs[np.minimum(j + _BLUE_RUN, defined.size)] == cs[j]
    if not clean_run.any():
        return m
    return int(defined[int(np.argmax(clean_run))]) * _BLUE_BIN


@dataclass(frozen=True)
class ContinuumFit:
    """Result of :func:`fit_continuum_details`.

    Attributes
    ----------
    continuum : ndarray of float64
        The continuum, finite and > 0 at every pixel (floored where the spline is not: such pixels are in
        ``masked`` or have no data).
    masked : ndarray of bool
        Pixels with data that the continuum cannot normalise and that must get ``ivar = 0``: the blue arm
        without usable flux, every pixel whose continuum is below :data:`CONTINUUM_MIN_PIXEL_SNR` times
        its noise (a continuum <= 0 included) and the ends where the spline only extrapolates.
    used : ndarray of bool
        Pixels of the final fit (data, outside the fixed mask, the blue arm and the clipped pixels).
    blue_end : int
        Number of grid pixels of the masked blue arm (0: none).
    n_iter : int
        Clipping iterations done.
    stop : str
        Why the clipping stopped: 'converged' (the clipped set repeats itself), 'cycle' (it alternates
        between sets seen before), 'min_pixels' (clipping further would leave fewer than the minimum
        number of pixels: the last fit is kept) or 'max_iter'.
    converged : bool
        'converged', or the last iteration changed the continuum by at most the tolerance.
    offset : ndarray of float64
        What the final fit subtracted from the flux of its pixels: the mean offset that the clipping
        gives to Gaussian noise, in flux units. Fitting ``flux - offset`` with weights ``ivar`` on
        ``used`` and no clipping reproduces ``continuum`` (the frozen pipeline of the Cramer-Rao bounds).
    """

    continuum: np.ndarray
    masked: np.ndarray
    used: np.ndarray
    blue_end: int
    n_iter: int
    stop: str
    converged: bool
    offset: np.ndarray


def _fit_iterative(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    exclude: np.ndarray | None,
    split: float,
    spacing_blue: float,
    spacing_red: float,
    penalty: float,
    niter: int,
    sigma_lo: float,
    sigma_hi: float,
    tol: float | None,
    min_pixels: int,
    first_pass: bool,
) -> ContinuumFit:
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    data = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    w0 = np.where(data, ivar, 0.0)
    f0 = np.where(data, flux, 0.0)
    blue_end = blue_arm_end(wave, f0, w0) if first_pass else 0
    base = data if exclude is None else data & ~exclude
    if blue_end:
        base = base.copy()
        base[:blue_end] = False
    if np.count_nonzero(base) < min_pixels:
        raise ContinuumError(f"too few usable pixels ({np.count_nonzero(base)} < {min_pixels})")
    basis = _spline_basis(wave, split, spacing_blue, spacing_red)
    sig = np.sqrt(np.divide(1.0, w0, out=np.zeros_like(w0), where=data))
    sqw = np.sqrt(w0)

    def clip_loop(
        base: np.ndarray, used: np.ndarray, cont: np.ndarray, hi: float
    ) -> tuple[np.ndarray, np.ndarray, int, str, float, np.ndarray]:
        # residuals are clipped in units of the clipping noise max(sigma, floor * continuum), i.e. at
        # [-lo * s, +hi * s] pixel sigmas with s >= 1 fixed for the loop (from the fit it starts at)
        s = np.maximum(1.0, CONTINUUM_CLIP_FLOOR * cont * sqw)
        lo_s = sigma_lo * s
        hi_s = hi * s
        # fit f - shift * sigma: removes the mean that the truncation of the residuals to [-lo s, +hi s]
        # gives to Gaussian noise, so the continuum carries no SNR-dependent bias from the noise
        ys = (f0, sig * _clip_shift(s, sigma_lo, hi))
        # the normal equations are linear in the weights: build them once, then update only the pixels
        # whose clipping state changes (a handful per iteration)
        ab, rhs = _normal_full(basis, np.where(used, w0, 0.0), ys)
        neg_lo_s = -lo_s
        seen: set[bytes] = set()
        prev = None  # the fit before the last one (the change between the two is computed once, at the end)
        stop = "max_iter"
        it = 0
        for it in range(1, niter + 1):  # noqa: B007 - the count is returned
            r = (f0 - cont) * sqw
            new_used = base & (r > neg_lo_s) & (r < hi_s)
            key = new_used.tobytes()
            if key in seen:  # this set was fitted before: a fixed point, or a cycle between sets
                stop = "converged" if np.array_equal(new_used, used) else "cycle"
                break
            if np.count_nonzero(new_used) < min_pixels:
                stop = "min_pixels"  # keep the last fit rather than fit too few pixels
                break
            flip = np.flatnonzero(new_used != used)
            if flip.size:
                dab, drhs = _normal_delta(basis, flip, np.where(new_used[flip], w0[flip], -w0[flip]), ys)
                ab += dab
                rhs += drhs
            used = new_used
            seen.add(key)
            prev, cont = cont, _evaluate(basis, _pspline_solve(basis, ab, rhs[0] - rhs[1], penalty))
        change = np.inf
        if prev is not None:  # relative change of the last iteration
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.abs(cont - prev) / np.abs(cont)
            change = float(np.max(rel, where=data, initial=0.0))
        if not np.all(np.isfinite(cont)):
            raise ContinuumError("non-finite continuum")
        return cont, used, it, stop, change, ys[1]

    def fit(base: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, str, float, np.ndarray]:
        n_climb = 0
        if first_pass:
            # start from the plain least-squares fit and climb, clipping only absorption: a fit started
            # through deep, wide bands (TiO, the blanketed blue of cool stars) is far below the
            # pseudo-continuum, and an upper clip would hold it there by rejecting the band heads as if
            # they were spikes (more so the higher the SNR)
            ab, rhs = _normal_full(basis, np.where(base, w0, 0.0), (f0,))
            cont = _evaluate(basis, _pspline_solve(basis, ab, rhs[0], penalty))
            cont, used, n_climb, _, _, _ = clip_loop(base, base, cont, math.inf)
        else:
            # a normalised spectrum: clip relative to its continuum, 1, rather than to a fit through the
            # bands, which the upper clip would keep below the band heads
            cont, used = np.ones_like(f0), base
        cont, used, n_iter, stop, change, offset = clip_loop(base, used, cont, sigma_hi)
        return cont, used, n_climb + n_iter, stop, change, offset

    cont, used, n_iter, stop, change, offset = fit(base)
    low = data & (cont * sqw < CONTINUUM_MIN_PIXEL_SNR)
    if np.any(low & base & (cont <= 0)) and np.count_nonzero(base & ~low) >= min_pixels:
        # the fit reaches zero where it has data (flux without signal that the blue-arm test did not
        # catch): drop the pixels whose flux is not above their noise and fit again
        base = base & ~low
        cont, used, more, stop, change, offset = fit(base)
        n_iter += more
        low = data & (cont * sqw < CONTINUUM_MIN_PIXEL_SNR)
    # beyond the outermost fitted pixels by more than a knot spacing the spline is an extrapolation
    fitted = np.flatnonzero(used)
    far = (wave < wave[fitted[0]] - spacing_blue) | (wave > wave[fitted[-1]] + spacing_red)
    masked = low | (data & far)
    masked[:blue_end] = data[:blue_end]
    kept = data & ~masked
    floor = 1e-3 * float(np.median(cont[kept])) if kept.any() else 0.0
    # positive everywhere (plots, undoing the normalisation): pixels below the floor are masked (a kept
    # pixel has a continuum above its noise, so this only matters at extreme SNR)
    masked |= data & (cont < floor)
    kept = data & ~masked
    if np.count_nonzero(kept) < min_pixels or not floor > 0:
        raise ContinuumError(
            f"continuum <= 0 or below the noise at {np.count_nonzero(masked)} of {np.count_nonzero(data)} "
            f"pixels with data (fewer than {min_pixels} usable)"
        )
    return ContinuumFit(
        continuum=np.maximum(cont, floor),
        masked=masked,
        used=used,
        blue_end=blue_end,
        n_iter=n_iter,
        stop=stop,
        converged=stop == "converged" or tol is None or (np.isfinite(change) and change <= tol),
        offset=offset,
    )


def fit_continuum_details(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    opts: PreprocessOptions,
    *,
    z: float = 0.0,
    second_pass: bool = False,
) -> ContinuumFit:
    """Robust penalised B-spline continuum (same algorithm at training and prediction time).

    A cubic B-spline with knots every ``opts.continuum_knot_spacing_blue`` A below
    ``opts.continuum_split_wave`` and every ``opts.continuum_knot_spacing_red`` A above is fitted by weighted
    least squares (weights ``ivar``) with a small second-difference penalty on its coefficients (a
    P-spline), which bridges gaps and edges smoothly instead of oscillating; the penalty is relative to
    the mean data weight so its effect does not depend on SNR. Pixels in :func:`continuum_mask` (strong
    lines, telluric bands shifted by ``z``) are excluded when ``opts.continuum_mask_lines``, and so is a
    blue arm without usable flux (:func:`blue_arm_end`; first pass only). Then, iteratively, pixels more
    than ``sigma_lo`` below (absorption) or ``sigma_hi`` above (spikes) the fit are excluded and the fit is
    redone, in units of the clipping noise ``max(sigma, CONTINUUM_CLIP_FLOOR * continuum)``: the pixel's
    noise up to a per-pixel SNR of 10, a fixed fraction of the continuum above. So between SNR 10 and
    1000 the same pixels are kept (the continuum and the lines too weak to clip, < 20 % deep by default),
    and the pseudo-continuum of a crowded cool star does not depend on the SNR. No median or quantile is
    used: every fit is a linear, unbiased function of the data, and the known mean offset that the
    truncation gives to Gaussian noise (``E[x | -lo s < x < hi s]`` with ``s`` the clipping noise in
    units of sigma; ~0.05 sigma for 2/3 at ``s = 1``) is subtracted from the retained pixels, so noise
    does not push the continuum up at low SNR.

    The first pass starts from the plain least-squares fit and first climbs (clipping absorption only,
    until the clipped set repeats itself) before clipping both sides: through deep, wide bands (TiO, the
    blanketed blue of cool stars) the plain fit lies far below the band heads, and an upper clip applied
    from there would reject them as spikes. The second pass starts from 1, the continuum of the normalised
    spectrum it refits. Each phase stops when the clipped set repeats itself (converged), alternates
    between sets already fitted (a cycle), would leave fewer than ``opts.continuum_min_pixels`` pixels,
    or after ``opts.continuum_niter`` (``opts.second_pass_niter``) iterations; the last fit is kept in
    every case and ``converged`` says whether it had settled (last change below ``opts.continuum_tol``).

    Where the fit is not above the noise of a pixel (``continuum * sqrt(ivar)`` below
    :data:`CONTINUUM_MIN_PIXEL_SNR`) the pixel is returned in ``masked``; if the fit even reaches zero at
    pixels it used, the pixels without usable flux are dropped and the fit redone once. Pixels more than a
    knot spacing beyond the outermost pixel of the final fit (an end of the spectrum clipped or dropped
    entirely, where the spline only extrapolates) are masked too. The returned continuum is floored to
    stay positive everywhere.

    Parameters
    ----------
    wave, flux, ivar : ndarray
        Rest-frame grid (strictly increasing), flux and inverse variance (``ivar <= 0``: no data).
    opts : PreprocessOptions
    z : float
        Redshift that was removed (places the telluric mask).
    second_pass : bool
        Use the second-pass settings (knots x ``opts.second_pass_knot_factor``, ``second_pass_sigma_lo/hi``,
        at most ``second_pass_niter`` iterations, no fixed line mask, no blue-arm test, no convergence
        requirement): for refitting an already normalised spectrum to remove residual tilt, cheaply.

    Returns
    -------
    ContinuumFit

    Raises
    ------
    ContinuumError
        Fewer than ``opts.continuum_min_pixels`` usable pixels (before clipping, or left after masking the
        pixels without usable flux), a singular system or a non-finite fit: the spectrum has no usable
        continuum at all.
    """
    if second_pass:
        f = opts.second_pass_knot_factor
        sb, sr = opts.continuum_knot_spacing_blue * f, opts.continuum_knot_spacing_red * f
        lo, hi = opts.second_pass_sigma_lo, opts.second_pass_sigma_hi
        exclude = None
        niter, tol = opts.second_pass_niter, None
    else:
        sb, sr = opts.continuum_knot_spacing_blue, opts.continuum_knot_spacing_red
        lo, hi = opts.continuum_sigma_lo, opts.continuum_sigma_hi
        exclude = continuum_mask(wave, z) if opts.continuum_mask_lines else None
        niter, tol = opts.continuum_niter, opts.continuum_tol
    return _fit_iterative(
        wave,
        flux,
        ivar,
        exclude=exclude,
        split=opts.continuum_split_wave,
        spacing_blue=sb,
        spacing_red=sr,
        penalty=opts.continuum_penalty,
        niter=niter,
        sigma_lo=lo,
        sigma_hi=hi,
        tol=tol,
        min_pixels=opts.continuum_min_pixels,
        first_pass=not second_pass,
    )


def fit_continuum(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    opts: PreprocessOptions,
    *,
    z: float = 0.0,
    second_pass: bool = False,
) -> np.ndarray:
    """The continuum of :func:`fit_continuum_details` alone: finite and > 0 at every pixel.

    Pixels the continuum cannot normalise (``ContinuumFit.masked``) are not reported here; callers that
    normalise should use :func:`fit_continuum_details` and give those pixels ``ivar = 0``.

    Raises
    ------
    ContinuumError
        As :func:`fit_continuum_details`.
    """
    return fit_continuum_details(wave, flux, ivar, opts, z=z, second_pass=second_pass).continuum


def normalize(flux: np.ndarray, ivar: np.ndarray, continuum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(flux / continuum, ivar * continuum**2)``.

    Raises :class:`ContinuumError` when the continuum is <= 0 at a pixel with data.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    cont = np.asarray(continuum, dtype=np.float64)
    pos = cont > 0
    if not np.all(pos[ivar > 0]):
        raise ContinuumError(f"continuum <= 0 at {np.count_nonzero(~pos & (ivar > 0))} pixels with data")
    safe = np.where(pos, cont, 1.0)
    return flux / safe, np.where(pos, ivar * safe * safe, 0.0)
