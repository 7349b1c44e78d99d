"""Cramer-Rao bounds: the information limit of a spectrum on each simulator label.

For a star with true labels ``theta`` (every label the simulator uses: ``teff``, ``logg``, ``fe_h`` and each
``X_FE`` of :data:`specabund.simulate.LABEL_COLUMNS`) and a preprocessed spectrum ``f(theta)`` with pixel
inverse variances ``w`` (the ``ivar`` of the normalised flux stored in the dataset, 0 = masked), the Fisher
matrix of Gaussian pixel noise is

    F = J^T diag(w) J,   J[p, k] = d f_p / d theta_k,

and no unbiased estimator of label ``k`` has a smaller standard deviation than

    sigma_CRB(k) = sqrt((F^-1)[k, k])      (marginalised over the other labels),

which is never smaller than the single-label bound ``1 / sqrt(F[k, k])`` (the other labels known). ``J`` comes
from central finite differences with the half-steps of :data:`DEFAULT_STEPS` (20 K, 0.05 dex in logg,
0.02 dex in [Fe/H] and every [X/Fe]). Measured on five stars (dwarfs and giants, SNR 50): halving the steps
changes every bound by < 0.5 %, doubling them by < 2 % (the largest change: [N/Fe], whose CN bands
saturate), in both modes; ``tests/test_crb.py`` keeps a check of this.

Two ways to compute ``f``:

``'model'`` (default)
    :func:`specabund.simulate.normalized_model_flux` on the dataset's rest-frame grid: the true continuum
    normalisation, no instrument. 33 evaluations per star, ~0.06 s per star on one core.
``'pipeline'``
    :func:`specabund.simulate.simulate_spectrum` (noiseless, ``rv = 0``, the same instrument response,
    reddening (``ebv`` of the truth, else 0), tellurics and sky for every evaluation of a star; g-band S/N
    from the truth's ``snr``, else 50) followed by the steps of
    :func:`specabund.preprocess.steps.preprocess_spectrum` (clean, optional denoise, resample, two-pass
    continuum, normalisation): the spectrum as the network sees it, including the pseudo-continuum the
    normalisation puts on crowded regions, which takes part of a line-depth change with it. The pipeline
    clips pixels iteratively, so it is only piecewise smooth; a pixel crossing a clipping threshold inside
    a finite difference would fake a huge derivative (bounds off by up to a factor 30 and unstable against
    the step). The masks and clipped sets found at the true labels are therefore frozen (``_FrozenPipeline``):
    the exact derivative of the smooth piece the true spectrum lies on. ~0.2 s per star. The instrument
    response is a random draw (seeded), not the star's own.

``'model'`` is the default: it is the information in the physics of the spectrum, independent of the
preprocessing choices and of an invented instrument response, and ~3x faster. Measured differences
(ratio pipeline / model bound): on 12 test stars of a simulated, preprocessed set (600 spectra, seed 2024,
the dataset's own ivar, ``benchmarks/train.py --quick`` data) the medians are 1.02 (Teff), 1.06 (logg,
[Fe/H], [C/Fe], [Mg/Fe]) and 1.11 ([Ca/Fe]), single stars 0.70-1.18; on 8 Galactic-like stars at a flat
SNR 50 (``draw_labels(8, default_rng(5))``, all 16 labels) the medians run from 0.88 ([Al/Fe]) to 1.12
([Ca/Fe]). The pipeline bound is mostly larger (the continuum fit absorbs part of every broad change) but
can be smaller where the pseudo-continuum sits below the true one (the normalised line depths, hence the
derivatives, are then larger for the same ivar). So the model bound is within ~10 % of the limit of this
exact preprocessing; pass ``mode='pipeline'`` for that limit itself.

When ``F`` (scaled by the steps) is too ill-conditioned to invert, a weak Gaussian prior of the width of the
simulator's label ranges (:data:`specabund.simulate.INDEPENDENT_RANGES`) is added to it (the Bayesian
Cramer-Rao bound) and the star is flagged (``CRBResult.regularised``, ``CRBResult.unconstrained``). In
practice this happens for [N/Fe] in cool giants (Teff below ~4200 K): the simulator's CN bands saturate
completely there, the derivative is exactly zero and the bound is the prior width (1.3 dex); the other
labels are not affected.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..catalog import spec_key
from ..dataset import Dataset
from ..elements import normalize_label
from ..errors import ConfigError, DataMismatchError
from ..metrics import DEFAULT_SNR_BINS, snr_bin_labels
from ..preprocess.options import PreprocessOptions
from ..preprocess.steps import (
    ContinuumError,
    clean,
    denoise,
    fit_continuum,
    fit_continuum_details,
    log_linear_grid,
    normalize,
    resample,
)
from ..simulate import INDEPENDENT_RANGES, LABEL_COLUMNS, normalized_model_flux, simulate_spectrum
from ..spectrum import Spectrum

__all__ = [
    "CRB_MODES",
    "DEFAULT_STEPS",
    "CRBResult",
    "cramer_rao_bounds",
    "crb_details",
    "fisher_matrix",
    "information_limit_table",
    "jacobian",
    "load_truth",
    "marginal_bounds",
    "simulator_label",
]

log = logging.getLogger(__name__)

#: Derivative modes of :func:`cramer_rao_bounds`.
CRB_MODES: tuple[str, ...] = ("model", "pipeline")

#: Central-difference half-steps per simulator label (a bit below the precision reachable at high SNR, far
#: above the float64 round-off of the model: the bounds change by < 2 % for steps 0.5x-2x these).
DEFAULT_STEPS: dict[str, float] = {
    "teff": 20.0,
    "logg": 0.05,
    "fe_h": 0.02,
    **{c: 0.02 for c in LABEL_COLUMNS if c.endswith("_FE")},
}

#: Condition number (of the step-scaled Fisher matrix) above which the weak prior is added.
MAX_CONDITION = 1e12


def simulator_label(name: str) -> str:
    """Simulator column (``teff``, ``logg``, ``fe_h``, ``X_FE``) of a label in any accepted spelling.

    Raises
    ------
    ConfigError
        When the simulator has no such label.
    """
    lab = normalize_label(name)
    key = {"TEFF": "teff", "LOGG": "logg", "FE_H": "fe_h"}.get(lab, lab)
    if key not in LABEL_COLUMNS:
        raise ConfigError(
            f"{name!r} ({lab}) is not a simulator label; the simulator uses {list(LABEL_COLUMNS)}"
        )
    return key


def _truth_column(truth: pd.DataFrame, key: str) -> str:
    for c in (key, key.upper(), key.lower()):  # exact spellings first: 'n' must not pass for N_FE
        if c in truth.columns:
            return c
    for c in truth.columns:
        if isinstance(c, str) and len(c) > 2 and normalize_label(c) == normalize_label(key):
            return c
    raise DataMismatchError(
        f"truth has no column for the simulator label {key!r} (columns: {list(truth.columns)}); "
        "the bounds are marginalised over every simulator label, so all of them are needed"
    )


def _check_mode(mode: str) -> str:
    if mode not in CRB_MODES:
        raise ConfigError(f"mode must be one of {CRB_MODES}, got {mode!r}")
    return mode


# ---------------------------------------------------------------------------------------------- Jacobian


class _FrozenPipeline:
    """The preprocessing of one star's noiseless simulated spectrum, linearised at its true labels.

    :func:`specabund.preprocess.steps.preprocess_spectrum` is piecewise smooth in the flux: given which
    pixels are masked and which the two continuum fits clip, it is linear (resampling, spline fits) followed
    by a division (normalisation). The decisions themselves jump when a pixel crosses a threshold, and such a
    jump inside a finite difference would fake a huge derivative. Here the decisions of the pipeline at the
    true labels (masks, spikes, the final clipped sets of both continuum passes) are frozen and the same
    steps (clean -> (denoise) -> resample -> continuum -> normalise -> second pass) are re-run on perturbed
    spectra with those pixels: the exact derivative of the smooth piece the true spectrum lies on.
    """

    def __init__(
        self,
        labels: Mapping[str, float],
        wavelength: np.ndarray,
        seed: int | Sequence[int],
        snr_g: float,
        ebv: float,
        options: PreprocessOptions,
    ) -> None:
        opts = options
        grid = log_linear_grid(opts.wave_min, opts.wave_max, opts.log_step)
        if grid.shape != wavelength.shape or not np.allclose(grid, wavelength, rtol=1e-9):
            raise DataMismatchError(
                "the preprocessing grid differs from the dataset's wavelength grid: pass the "
                "PreprocessOptions that produced the dataset"
            )
        self.grid = grid
        self.seed = seed
        self.snr_g = float(snr_g)
        self.ebv = float(ebv)
        self.opts = opts
        spec = self._simulate(labels)
        cleaned = clean(spec, opts)
        self.wave_obs = np.asarray(cleaned.wavelength, dtype=np.float64)
        self.ivar_obs = np.asarray(cleaned.ivar, dtype=np.float64)
        flux, ivar = cleaned.flux, self.ivar_obs
        if opts.denoise:
            flux, ivar = denoise(flux, ivar, opts)
        self.ivar_res = ivar
        rflux, rivar = self._resample(flux)
        self.rivar = rivar
        # first pass: the pixels the pipeline's continuum fit kept at convergence (clipping, line mask, a
        # masked blue arm), and the pixels it masked (ivar 0 after normalisation)
        fit1 = fit_continuum_details(grid, rflux, rivar, opts, z=0.0)
        self.w1 = np.where(fit1.used, rivar, 0.0)
        self.masked1 = fit1.masked
        self.offset1 = fit1.offset  # the clipping's noise offset, a constant of the frozen fit
        self.w2: np.ndarray | None = None
        self.offset2 = np.zeros_like(grid)
        if opts.second_pass:
            nflux, nivar = normalize(rflux, np.where(fit1.masked, 0.0, rivar), fit1.continuum)
            fit2 = fit_continuum_details(grid, nflux, nivar, opts, second_pass=True)
            self.w2, self.offset2 = fit2.used, fit2.offset
        # the same fits without clipping or line mask: the frozen weights carry those decisions
        self.noclip = dataclasses.replace(
            opts,
            continuum_sigma_lo=100.0,
            continuum_sigma_hi=100.0,
            second_pass_sigma_lo=100.0,
            second_pass_sigma_hi=100.0,
            continuum_mask_lines=False,
        )

    def _simulate(self, labels: Mapping[str, float]) -> Spectrum:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed))  # same instrument for every call
        return simulate_spectrum(labels, rng, snr_g=self.snr_g, rv_kms=0.0, noiseless=True, ebv=self.ebv)

    def _resample(self, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return resample(self.wave_obs, flux, self.ivar_res, self.grid, min_coverage=self.opts.min_coverage)

    def __call__(self, labels: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        flux = np.asarray(self._simulate(labels).flux, dtype=np.float64)
        flux = np.where(self.ivar_obs > 0, flux, 0.0)
        if self.opts.denoise:
            flux, _ = denoise(flux, self.ivar_obs, self.opts)
        rflux, _ = self._resample(flux)
        cont1 = fit_continuum(self.grid, rflux - self.offset1, self.w1, self.noclip, z=0.0)
        nflux, nivar = normalize(rflux, np.where(self.masked1, 0.0, self.rivar), cont1)
        if self.w2 is not None:
            cont2 = fit_continuum(
                self.grid, nflux - self.offset2, np.where(self.w2, nivar, 0.0), self.noclip, second_pass=True
            )
            nflux, nivar = normalize(nflux, nivar, cont2)
        return nflux, nivar > 0


def jacobian(
    labels: Mapping[str, float],
    wavelength: np.ndarray,
    parameters: Sequence[str] | None = None,
    *,
    steps: Mapping[str, float] | None = None,
    step_scale: float = 1.0,
    mode: str = "model",
    seed: int | Sequence[int] = 0,
    snr_g: float = 50.0,
    ebv: float = 0.0,
    options: PreprocessOptions | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central-difference derivatives of the preprocessed spectrum with respect to simulator labels.

    Parameters
    ----------
    labels : mapping
        Every simulator label of the star (``teff``, ``logg``, ``fe_h``, ``X_FE``; any spelling).
    wavelength : ndarray (P,)
        Rest-frame grid of the dataset.
    parameters : sequence of str, optional
        Labels to differentiate by (default all of :data:`LABEL_COLUMNS`), in column order of the result.
    steps : mapping, optional
        Half-steps overriding :data:`DEFAULT_STEPS`.
    step_scale : float
        Multiplies every step (for stability checks).
    mode : {'model', 'pipeline'}
        See the module docstring.
    seed : int or sequence of int
        ``'pipeline'``: seed of the instrument response, sky, tellurics and grid (the same for every
        evaluation of the star).
    snr_g, ebv : float
        ``'pipeline'``: g-band S/N (steers the clipping of the continuum fit) and reddening.
    options : PreprocessOptions, optional
        ``'pipeline'``: the options that produced the dataset (default: the defaults).

    Returns
    -------
    flux : ndarray (P,)
        The spectrum at ``labels``.
    jac : ndarray (P, K)
        ``d flux / d parameter`` per unit of each parameter (K, dex).
    usable : ndarray (P,) of bool
        Pixels with a valid derivative: all in ``'model'`` mode; in ``'pipeline'`` mode those the
        preprocessing keeps (``ivar > 0``) at the true labels and in every evaluation.
    """
    _check_mode(mode)
    wave = np.asarray(wavelength, dtype=np.float64)
    params = [simulator_label(p) for p in (parameters or LABEL_COLUMNS)]
    base: dict[str, float] = {}
    for k, v in labels.items():
        try:
            base[simulator_label(str(k))] = float(v)
        except ConfigError:
            continue  # spec, snr, ebv ... are not labels
    missing = [p for p in LABEL_COLUMNS if p not in base]
    if missing:
        raise DataMismatchError(f"labels lack the simulator label(s) {missing}")
    hs = {**DEFAULT_STEPS, **{simulator_label(k): float(v) for k, v in (steps or {}).items()}}
    opts = options or PreprocessOptions()

    frozen = _FrozenPipeline(base, wave, seed, snr_g, ebv, opts) if mode == "pipeline" else None

    def evaluate(lab: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        if frozen is None:
            return normalized_model_flux(lab, wave), np.ones(wave.size, dtype=bool)
        return frozen(lab)

    f0, usable = evaluate(base)
    usable = usable.copy()
    jac = np.empty((wave.size, len(params)))
    for j, p in enumerate(params):
        h = hs[p] * step_scale
        if not h > 0:
            raise ConfigError(f"step of {p} must be > 0, got {h}")
        plus, ok_p = evaluate({**base, p: base[p] + h})
        minus, ok_m = evaluate({**base, p: base[p] - h})
        usable &= ok_p & ok_m
        jac[:, j] = (plus - minus) / (2.0 * h)
    bad = ~np.isfinite(jac).all(axis=1) | ~np.isfinite(f0)
    usable &= ~bad
    jac[~usable] = 0.0
    return f0, jac, usable


# ---------------------------------------------------------------------------------------- Fisher algebra


def fisher_matrix(jac: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """``J^T diag(ivar) J``; pixels with ``ivar <= 0`` or non-finite values contribute nothing."""
    w = np.asarray(ivar, dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    j = np.asarray(jac, dtype=np.float64)
    if j.shape[0] != w.size:
        raise DataMismatchError(f"jacobian has {j.shape[0]} pixels, ivar has {w.size}")
    a = j * np.sqrt(w)[:, None]  # A^T A is BLAS syrk: fast and exactly symmetric
    return a.T @ a


def marginal_bounds(
    fisher: np.ndarray,
    scales: np.ndarray | None = None,
    prior_sigma: np.ndarray | None = None,
    max_condition: float = MAX_CONDITION,
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Marginalised and single-label bounds from one Fisher matrix.

    Parameters
    ----------
    fisher : ndarray (K, K)
    scales : ndarray (K,), optional
        Typical size of each parameter (e.g. the steps): the matrix is inverted in these units, so K and dex
        do not wreck the conditioning.
    prior_sigma : ndarray (K,), optional
        Widths of the weak prior added when the scaled matrix is ill-conditioned (default: the full widths
        of :data:`specabund.simulate.INDEPENDENT_RANGES` when K matches :data:`LABEL_COLUMNS`, else 1e3 x
        the scales).
    max_condition : float
        Condition number of the scaled matrix above which the prior is added.

    Returns
    -------
    marginal : ndarray (K,)
        ``sqrt(diag(F^-1))``.
    single : ndarray (K,)
        ``1 / sqrt(F_ii)`` (inf where ``F_ii = 0``).
    condition : float
        Condition number of the scaled matrix.
    regularised : bool
        Whether the prior was added.
    """
    f = np.asarray(fisher, dtype=np.float64)
    k = f.shape[0]
    d = np.ones(k) if scales is None else np.asarray(scales, dtype=np.float64)
    diag = np.diag(f)
    with np.errstate(divide="ignore"):
        single = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), np.inf)
    fs = f * d[:, None] * d[None, :]
    evals = np.linalg.eigvalsh(fs)
    top = float(evals[-1])
    low = float(evals[0])
    condition = float("inf") if top <= 0 or low <= 0 else top / low
    regularised = not condition <= max_condition
    if regularised:
        if prior_sigma is None:
            if k == len(LABEL_COLUMNS):
                prior_sigma = np.array([np.subtract(*INDEPENDENT_RANGES[c][::-1]) for c in LABEL_COLUMNS])
            else:
                prior_sigma = 1e3 * d
        fs = fs + np.diag((d / np.asarray(prior_sigma, dtype=np.float64)) ** 2)
    # eigen-decomposition inverse of the symmetric scaled matrix (pseudo-inverse guard on round-off)
    w, v = np.linalg.eigh(fs)
    w_inv = np.where(w > w[-1] * 1e-15, 1.0 / np.where(w > 0, w, 1.0), 0.0)
    cov_s = (v * w_inv[None, :]) @ v.T
    marginal = np.sqrt(np.clip(np.diag(cov_s), 0.0, None)) * d
    return marginal, single, condition, regularised


def _weak_labels(fisher: np.ndarray, scales: np.ndarray, max_condition: float = MAX_CONDITION) -> list[str]:
    """Labels dominating the eigenvectors of the scaled Fisher matrix below ``top / max_condition``."""
    fs = fisher * scales[:, None] * scales[None, :]
    w, v = np.linalg.eigh(fs)
    weak = np.flatnonzero(w < w[-1] / max_condition)
    return sorted({LABEL_COLUMNS[int(np.argmax(np.abs(v[:, j])))] for j in weak})


# --------------------------------------------------------------------------------------------- per star


@dataclass
class CRBResult:
    """Bounds of many stars with diagnostics (see :func:`crb_details`).

    Attributes
    ----------
    labels : list of str
        Requested labels (columns of ``bounds`` and ``single``), as given.
    bounds : ndarray (N, L)
        Marginalised bounds (NaN where the star's spectrum could not be evaluated).
    single : ndarray (N, L)
        Unmarginalised bounds ``1 / sqrt(F_ii)`` (the other labels known).
    condition : ndarray (N,)
        Condition number of the step-scaled Fisher matrix.
    regularised : ndarray (N,) of bool
        The weak prior was added (ill-conditioned Fisher matrix).
    n_pixels : ndarray (N,) of int
        Pixels that contributed (``ivar > 0`` and a valid derivative).
    fisher : ndarray (N, K, K) or None
        The Fisher matrices over :data:`LABEL_COLUMNS` (with ``keep_fisher=True``).
    unconstrained : dict
        Star index -> simulator labels dominating the directions the spectrum says (almost) nothing about,
        for the regularised stars (e.g. ``['N_FE']`` in cool giants, whose CN bands saturate).
    """

    labels: list[str]
    bounds: np.ndarray
    single: np.ndarray
    condition: np.ndarray
    regularised: np.ndarray
    n_pixels: np.ndarray
    fisher: np.ndarray | None = None
    unconstrained: dict[int, list[str]] = dataclasses.field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per star: the bounds (``<label>``), single-label bounds (``<label>_single``) and flags."""
        df = pd.DataFrame(self.bounds, columns=self.labels)
        for j, lab in enumerate(self.labels):
            df[f"{lab}_single"] = self.single[:, j]
        df["condition"] = self.condition
        df["regularised"] = self.regularised
        df["n_pixels"] = self.n_pixels
        return df


def _star_labels(truth: pd.DataFrame, cols: dict[str, str], i: int) -> dict[str, float]:
    row = truth.iloc[i]
    return {p: float(row[c]) for p, c in cols.items()}


def _optional(truth: pd.DataFrame, name: str, i: int, default: float) -> float:
    if name not in truth.columns:
        return default
    v = pd.to_numeric(truth[name].iloc[i], errors="coerce")
    return float(v) if np.isfinite(v) else default


def crb_details(
    truth: pd.DataFrame,
    ivar: np.ndarray,
    wavelength: np.ndarray,
    labels: Sequence[str],
    mode: str = "model",
    *,
    steps: Mapping[str, float] | None = None,
    step_scale: float = 1.0,
    options: PreprocessOptions | None = None,
    seed: int = 0,
    keep_fisher: bool = False,
) -> CRBResult:
    """Cramer-Rao bounds with diagnostics; :func:`cramer_rao_bounds` returns only ``.bounds``.

    Parameters
    ----------
    truth, ivar, wavelength, labels, mode
        See :func:`cramer_rao_bounds`.
    steps, step_scale
        Finite-difference half-steps (see :func:`jacobian`).
    options : PreprocessOptions, optional
        ``'pipeline'`` mode: the preprocessing of the dataset.
    seed : int
        ``'pipeline'`` mode: star ``i`` uses the instrument seed ``(seed, i)``.
    keep_fisher : bool
        Keep the Fisher matrices.

    Returns
    -------
    CRBResult
    """
    _check_mode(mode)
    iv = np.asarray(ivar, dtype=np.float64)
    wave = np.asarray(wavelength, dtype=np.float64)
    if iv.ndim == 1:
        iv = iv[None, :]
    if iv.ndim != 2 or iv.shape[1] != wave.size:
        raise DataMismatchError(f"ivar has shape {iv.shape}, expected (N, {wave.size})")
    if len(truth) != iv.shape[0]:
        raise DataMismatchError(f"truth has {len(truth)} rows, ivar has {iv.shape[0]}")
    want = [simulator_label(lab) for lab in labels]
    params = list(LABEL_COLUMNS)
    idx = [params.index(w) for w in want]
    cols = {p: _truth_column(truth, p) for p in params}
    vals = truth[list(cols.values())].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    hs = {**DEFAULT_STEPS, **{simulator_label(k): float(v) for k, v in (steps or {}).items()}}
    scales = np.array([hs[p] for p in params])

    n, nl, k = iv.shape[0], len(want), len(params)
    bounds = np.full((n, nl), np.nan)
    single = np.full((n, nl), np.nan)
    cond = np.full(n, np.nan)
    reg = np.zeros(n, dtype=bool)
    npix = np.zeros(n, dtype=int)
    fisher = np.full((n, k, k), np.nan) if keep_fisher else None
    unconstrained: dict[int, list[str]] = {}
    for i in range(n):
        if not np.isfinite(vals[i]).all():
            log.warning("star %d: missing true labels, no bound", i)
            continue
        lab = _star_labels(truth, cols, i)
        try:
            _, jac, usable = jacobian(
                lab,
                wave,
                params,
                steps=hs,
                step_scale=step_scale,
                mode=mode,
                seed=(int(seed), i),
                snr_g=_optional(truth, "snr", i, 50.0),
                ebv=_optional(truth, "ebv", i, 0.0),
                options=options,
            )
        except ContinuumError as exc:
            log.warning("star %d: the preprocessing of its simulated spectrum failed (%s), no bound", i, exc)
            continue
        w = np.where(usable, iv[i], 0.0)
        npix[i] = int(np.count_nonzero(np.isfinite(w) & (w > 0)))
        if npix[i] == 0:
            log.warning("star %d: no usable pixel, no bound", i)
            continue
        f = fisher_matrix(jac, w)
        if fisher is not None:
            fisher[i] = f
        m, s, c, r = marginal_bounds(f, scales=scales)
        bounds[i], single[i], cond[i], reg[i] = m[idx], s[idx], c, r
        if r:
            unconstrained[i] = _weak_labels(f, scales)
    if reg.any():
        counts = Counter(lab for labs in unconstrained.values() for lab in labs)
        hit = sorted(set(counts) & set(want))
        (log.warning if hit else log.info)(
            "%d of %d stars have an ill-conditioned Fisher matrix (condition > %.0e): a weak prior of the "
            "simulator's label ranges was added (CRBResult.regularised); unconstrained: %s; %s",
            int(reg.sum()),
            n,
            MAX_CONDITION,
            ", ".join(f"{k} ({v} stars)" for k, v in counts.most_common()),
            f"requested labels affected: {hit}" if hit else "no requested label is affected",
        )
    return CRBResult(
        labels=[str(x) for x in labels],
        bounds=bounds,
        single=single,
        condition=cond,
        regularised=reg,
        n_pixels=npix,
        fisher=fisher,
        unconstrained=unconstrained,
    )


def cramer_rao_bounds(
    truth: pd.DataFrame,
    ivar: np.ndarray,
    wavelength: np.ndarray,
    labels: list[str],
    mode: str = "model",
    **kwargs: Any,
) -> np.ndarray:
    """Marginalised Cramer-Rao bound of each requested label for each star.

    Parameters
    ----------
    truth : DataFrame (N rows)
        Every simulator label per star (``teff``, ``logg``, ``fe_h``, each ``X_FE``; any spelling), e.g. from
        :func:`load_truth`. Optional ``snr`` and ``ebv`` columns are used in ``'pipeline'`` mode.
    ivar : ndarray (N, P)
        Inverse variance of the normalised flux, as stored in the dataset (0 = masked).
    wavelength : ndarray (P,)
        The dataset's rest-frame grid.
    labels : list of str
        Labels whose bounds to return (``TEFF``, ``C_FE``, ... any spelling; must be simulator labels).
    mode : {'model', 'pipeline'}
        How the derivatives are computed (module docstring).
    **kwargs
        Passed to :func:`crb_details` (``steps``, ``step_scale``, ``options``, ``seed``).

    Returns
    -------
    ndarray (N, len(labels))
        Bounds in the label's units (K, dex); NaN where a star could not be evaluated.
    """
    return crb_details(truth, ivar, wavelength, labels, mode, **kwargs).bounds


# ---------------------------------------------------------------------------------------- truth and table


def load_truth(truth_csv: str | Path, dataset: Dataset) -> pd.DataFrame:
    """Rows of the simulator's ``truth.csv`` matching the dataset's rows (on ``spec``), in dataset order.

    Raises
    ------
    DataMismatchError
        When the file lacks ``spec`` or a simulator label column, or dataset spectra have no truth row.
    """
    path = Path(truth_csv)
    if not path.is_file():
        raise DataMismatchError(f"{path}: truth file not found")
    table = pd.read_csv(path)
    if "spec" not in table.columns:
        raise DataMismatchError(f"{path}: no 'spec' column (columns: {list(table.columns)})")
    for p in LABEL_COLUMNS:
        _truth_column(table, p)
    keys = table["spec"].astype(str).map(spec_key)
    dup = keys.duplicated(keep="first")
    if dup.any():
        log.warning("%s: %d duplicated spec keys, the first row of each is used", path, int(dup.sum()))
    index = pd.Series(np.arange(len(table)), index=keys)[~dup.to_numpy()]
    want = [spec_key(s) for s in np.asarray(dataset.spec, dtype=str)]
    pos = index.reindex(want)
    missing = [w for w, p in zip(want, pos.to_numpy(), strict=True) if not np.isfinite(p)]
    if missing:
        raise DataMismatchError(
            f"{path}: {len(missing)} of {len(want)} dataset spectra have no truth row "
            f"(e.g. {', '.join(missing[:5])}); use the truth.csv of the simulation that made the dataset"
        )
    return table.iloc[pos.to_numpy(dtype=int)].reset_index(drop=True)


def information_limit_table(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    bounds: np.ndarray,
    snr: np.ndarray,
    labels: Sequence[str],
    snr_bins: Sequence[float] = DEFAULT_SNR_BINS,
) -> pd.DataFrame:
    """Achieved accuracy against the Cramer-Rao bound, per label and SNR bin.

    Parameters
    ----------
    y_true, y_pred, bounds : ndarray (N, L)
        True and predicted labels and the bounds of :func:`cramer_rao_bounds`.
    snr : ndarray (N,)
        Per-star S/N used for binning.
    labels : sequence of str
        Column names.
    snr_bins : sequence of float
        Bin edges (left-closed); a row ``'all'`` covers every star.

    Returns
    -------
    DataFrame
        One row per label and bin: ``label``, ``snr_bin``, ``snr_lo``, ``snr_hi``, ``n`` (stars with a
        finite prediction, truth and bound), ``rmse``, ``bias``, ``median_bound``, ``rms_bound``
        (sqrt of the mean squared bound: what an efficient unbiased estimator would reach), ``ratio``
        (``rmse / median_bound``) and ``z_rms`` (rms of residual / bound per star; 1 at the limit).

    Notes
    -----
    The bound holds for unbiased estimators. A network trained on a label distribution shrinks its
    predictions towards that distribution where the spectrum is uninformative, so at low SNR, where the
    bound exceeds the spread of the training labels, ratios below 1 are expected and mean "prior-dominated",
    not "better than the limit"; compare at SNR where the bound is well below that spread (e.g. > 50).
    """
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    b = np.asarray(bounds, dtype=float)
    s = np.asarray(snr, dtype=float).ravel()
    nl = len(labels)
    for name, a in (("y_true", t), ("y_pred", p), ("bounds", b)):
        if a.shape != (s.size, nl):
            raise DataMismatchError(f"{name} has shape {a.shape}, expected ({s.size}, {nl})")
    edges = [float(e) for e in snr_bins]
    if len(edges) < 2 or any(hi <= lo for lo, hi in itertools.pairwise(edges)):
        raise ConfigError(f"snr_bins must be increasing edges, got {snr_bins}")
    named = zip(snr_bin_labels(edges), edges[:-1], edges[1:], strict=True)
    bins = [("all", -np.inf, np.inf), *named]
    rows = []
    for j, lab in enumerate(labels):
        ok = np.isfinite(t[:, j]) & np.isfinite(p[:, j]) & np.isfinite(b[:, j]) & (b[:, j] > 0)
        for name, lo, hi in bins:
            sel = ok & (s >= lo) & (s < hi) if name != "all" else ok
            r = p[sel, j] - t[sel, j]
            n = int(sel.sum())
            nan = float("nan")
            rmse = float(np.sqrt(np.mean(r**2))) if n else nan
            med = float(np.median(b[sel, j])) if n else nan
            rows.append(
                {
                    "label": str(lab),
                    "snr_bin": name,
                    "snr_lo": lo,
                    "snr_hi": hi,
                    "n": n,
                    "rmse": rmse,
                    "bias": float(np.mean(r)) if n else nan,
                    "median_bound": med,
                    "rms_bound": float(np.sqrt(np.mean(b[sel, j] ** 2))) if n else nan,
                    "ratio": rmse / med if n else nan,
                    "z_rms": float(np.sqrt(np.mean((r / b[sel, j]) ** 2))) if n else nan,
                }
            )
    return pd.DataFrame(rows)
