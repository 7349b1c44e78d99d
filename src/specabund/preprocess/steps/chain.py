"""Step 7: the chain: :func:`preprocess_spectrum` runs steps 1-6 on one spectrum and never raises."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...spectrum import Spectrum
from ..options import PreprocessOptions
from .cleaning import clean
from .continuum import ContinuumError, fit_continuum_details, normalize
from .denoising import denoise
from .quality import good_fraction, measure_snr
from .resampling import _cached_grid, resample
from .rest_frame import C_KMS, refine_rv, to_rest_frame

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- 7. the chain


@dataclass
class PreprocessResult:
    """Output of :func:`preprocess_spectrum` for one spectrum.

    Attributes
    ----------
    flux, ivar : ndarray of float32
        Continuum-normalised flux on ``wavelength`` and its inverse variance (0 = no information; the flux of
        such pixels is 1 when ``fill_masked``).
    wavelength : ndarray of float64
        The common rest-frame grid (:func:`log_linear_grid` of the options).
    continuum : ndarray of float32
        The total continuum (first pass x second pass) in the input flux units: finite and > 0 at every
        pixel when the continuum step succeeded, NaN everywhere when it failed.
    snr_header : float
        ``meta['snr_g']`` (NaN when absent).
    snr_measured, snr_der : float
        :func:`measure_snr` of the cleaned input spectrum over the observed range mapping onto the grid.
    good_fraction : float
        Fraction of grid pixels with ``ivar > 0`` after resampling, before the continuum step (the pixels
        it masks, see ``metadata``, do not count against a spectrum).
    rv_source : str
        'csv_rv' (``rv_kms`` argument), 'header_z' (header Z) or 'none'.
    rv_used_kms : float
        Velocity removed (including a cross-correlation refinement), km/s.
    rv_correction_kms, rv_correction_err_kms : float
        Refinement by :func:`refine_rv` (NaN when not done or failed).
    status : str
        'ok', 'too_few_pixels', 'low_snr' or 'continuum_failed: <reason>'.
    stages : dict or None
        With ``keep_stages=True``: ``{name: (wave, flux)}`` for 'raw', 'cleaned' (observed frame; masked
        pixels NaN), 'rest_resampled', 'continuum', 'normalised' (grid; masked pixels NaN).
    metadata : dict
        What the continuum step did (empty when it failed): ``continuum_blue_end_wave`` (rest wavelength,
        A, of the first grid pixel after a blue arm without usable flux, whose pixels got ``ivar = 0``;
        NaN when none), ``continuum_masked_pixels`` (grid pixels with data given ``ivar = 0`` by the
        continuum steps, that blue arm included), ``continuum_converged`` (bool), ``continuum_stop``
        ('converged', 'cycle', 'min_pixels' or 'max_iter') and ``continuum_iterations`` of the first pass.
    """

    flux: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    continuum: np.ndarray
    snr_header: float
    snr_measured: float
    snr_der: float
    good_fraction: float
    rv_source: str
    rv_used_kms: float
    status: str
    rv_correction_kms: float = float("nan")
    rv_correction_err_kms: float = float("nan")
    stages: dict[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when ``status == 'ok'``."""
        return self.status == "ok"


def _meta_float(meta: dict[str, Any], key: str) -> float:
    value = meta.get(key)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
    return out if math.isfinite(out) else float("nan")


def _normalise_on_grid(
    grid: np.ndarray, flux: np.ndarray, ivar: np.ndarray, opts: PreprocessOptions, z: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    fit = fit_continuum_details(grid, flux, ivar, opts, z=z)
    has_data = ivar > 0
    ivar = np.where(fit.masked, 0.0, ivar)
    cont = fit.continuum
    nflux, nivar = normalize(flux, ivar, cont)
    if opts.second_pass:
        fit2 = fit_continuum_details(grid, nflux, nivar, opts, z=z, second_pass=True)
        nivar = np.where(fit2.masked, 0.0, nivar)
        nflux, nivar = normalize(nflux, nivar, fit2.continuum)
        cont = cont * fit2.continuum
    info: dict[str, Any] = {
        "continuum_blue_end_wave": float(grid[fit.blue_end]) if fit.blue_end else float("nan"),
        "continuum_masked_pixels": int(np.count_nonzero(has_data & ~(nivar > 0))),
        "continuum_converged": fit.converged,
        "continuum_stop": fit.stop,
        "continuum_iterations": fit.n_iter,
    }
    return cont, nflux, nivar, info


def preprocess_spectrum(
    spec: Spectrum,
    opts: PreprocessOptions,
    *,
    rv_kms: float | None = None,
    keep_stages: bool = False,
    template: tuple[np.ndarray, np.ndarray] | None = None,
) -> PreprocessResult:
    """Run the whole chain on one spectrum; never raises for a bad spectrum.

    clean -> (denoise) -> rest frame -> resample onto the common grid -> continuum -> normalise ->
    second pass (refit of the normalised spectrum with stiffer knots and stricter clipping; removes residual
    tilt) -> (optional cross-correlation RV refinement against ``template``, then redo from the rest frame)
    -> quality checks. Pixels without usable flux (a blue arm without signal, pixels whose continuum is
    below their noise; see :func:`fit_continuum_details`) get ``ivar = 0`` and are counted in
    ``metadata``; they never reject the spectrum.

    Parameters
    ----------
    spec : Spectrum
        Observed spectrum (vacuum wavelength).
    opts : PreprocessOptions
    rv_kms : float, optional
        Radial velocity from a catalogue; wins over the header redshift when given and finite.
    keep_stages : bool
        Keep intermediate arrays for :func:`plot_stages`.
    template : (wave, flux), optional
        Rest-frame, continuum-normalised template; required when ``opts.refine_rv``.

    Returns
    -------
    PreprocessResult
        ``status`` is the first failing check in the order 'too_few_pixels' (good fraction on the grid below
        ``min_good_fraction``), 'low_snr' (measured SNR below ``min_snr``), 'continuum_failed: reason'
        (no continuum at all: fewer than ``continuum_min_pixels`` pixels with usable flux).

    Raises
    ------
    ConfigError
        ``opts.refine_rv`` without a template (a usage error, not a bad spectrum).
    """
    if opts.refine_rv and template is None:
        raise ConfigError("refine_rv is true but no template was given to preprocess_spectrum")
    grid = _cached_grid(opts.wave_min, opts.wave_max, opts.log_step)
    ngrid = grid.size
    meta = spec.meta or {}

    # velocity
    if rv_kms is not None and math.isfinite(float(rv_kms)):
        v, rv_source = float(rv_kms), "csv_rv"
    else:
        z_head = _meta_float(meta, "z")
        if opts.rv_source == "header" and math.isfinite(z_head) and z_head > -1:
            v, rv_source = z_head * C_KMS, "header_z"
        else:
            v, rv_source = 0.0, "none"

    cleaned = clean(spec, opts)
    flux, ivar = cleaned.flux, cleaned.ivar
    if opts.denoise:
        flux, ivar = denoise(flux, ivar, opts)
    wave = cleaned.wavelength

    z = v / C_KMS
    in_range = (wave >= opts.wave_min * (1 + z)) & (wave <= opts.wave_max * (1 + z))
    snr_ivar, snr_der = measure_snr(flux[in_range], ivar[in_range])
    snr = snr_ivar if opts.snr_estimator == "ivar" else snr_der

    status = "ok"
    cont = np.full(ngrid, np.nan)
    nflux = np.ones(ngrid)
    nivar = np.zeros(ngrid)
    dv, dv_err = float("nan"), float("nan")
    info: dict[str, Any] = {}
    rflux, rivar = resample(to_rest_frame(wave, z), flux, ivar, grid, min_coverage=opts.min_coverage)
    gfrac = good_fraction(rivar)
    if gfrac < opts.min_good_fraction:
        status = "too_few_pixels"
    elif not (snr >= opts.min_snr):
        status = "low_snr"
    try:
        cont, nflux, nivar, info = _normalise_on_grid(grid, rflux, rivar, opts, z)
        if opts.refine_rv and template is not None:
            dv, dv_err = refine_rv(
                grid,
                nflux,
                nivar,
                template[0],
                template[1],
                v_max_kms=opts.rv_max_kms,
                v_step_kms=opts.rv_step_kms,
            )
            if math.isfinite(dv):
                v = v + dv
                z = v / C_KMS
                rflux, rivar = resample(
                    to_rest_frame(wave, z), flux, ivar, grid, min_coverage=opts.min_coverage
                )
                gfrac = good_fraction(rivar)
                cont, nflux, nivar, info = _normalise_on_grid(grid, rflux, rivar, opts, z)
            else:
                logger.debug("RV refinement failed for %s", meta.get("filename"))
    except ContinuumError as exc:
        if status == "ok":
            status = f"continuum_failed: {exc.reason}"
        cont = np.full(ngrid, np.nan)
        nflux = np.ones(ngrid)
        nivar = np.zeros(ngrid)
        info = {}

    # an inverse variance beyond float32 (absurd header or flux scales) would become inf: no usable data
    nivar = np.where(np.isfinite(nivar) & (nivar < np.finfo(np.float32).max), nivar, 0.0)
    masked = ~(nivar > 0)
    out_flux = np.where(masked, 1.0, nflux) if opts.fill_masked else nflux
    stages = None
    if keep_stages:
        stages = {
            "raw": (np.asarray(spec.wavelength, dtype=np.float64), np.asarray(spec.flux, dtype=np.float64)),
            "cleaned": (wave, np.where(cleaned.ivar > 0, cleaned.flux, np.nan)),
            "rest_resampled": (grid, np.where(rivar > 0, rflux, np.nan)),
            "continuum": (grid, cont.copy()),
            "normalised": (grid, np.where(masked, np.nan, nflux)),
        }
    return PreprocessResult(
        flux=out_flux.astype(np.float32),
        ivar=nivar.astype(np.float32),
        wavelength=np.array(grid),
        continuum=cont.astype(np.float32),
        snr_header=_meta_float(meta, "snr_g"),
        snr_measured=float(snr_ivar),
        snr_der=float(snr_der),
        good_fraction=gfrac,
        rv_source=rv_source,
        rv_used_kms=float(v),
        status=status,
        rv_correction_kms=float(dv),
        rv_correction_err_kms=float(dv_err),
        stages=stages,
        metadata=info,
    )
