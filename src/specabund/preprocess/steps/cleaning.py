"""Step 1: cleaning: bad pixels from the masks and ivar, and positive spikes (cosmic rays, sky residuals)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter1d, median_filter

from ...spectrum import Spectrum
from ..options import PreprocessOptions

# ----------------------------------------------------------------------------------------------- 1. clean


def _bad_pixels(spec: Spectrum, opts: PreprocessOptions) -> np.ndarray:
    flux = np.asarray(spec.flux)
    ivar = np.asarray(spec.ivar)
    mask = np.asarray(spec.andmask if opts.mask_source == "andmask" else spec.ormask)
    bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | ~(ivar > 0)
    value = opts.bad_mask_value
    if value:
        # masks may arrive as float (DR1-DR8 image layouts) or big-endian ints; compare as int64
        bad |= (np.nan_to_num(mask, nan=0.0).astype(np.int64) & value) != 0
    return bad


def find_spikes(flux: np.ndarray, ivar: np.ndarray, opts: PreprocessOptions) -> np.ndarray:
    """Boolean mask of positive outliers (cosmic rays, sky-subtraction residuals).

    A good pixel is a spike when it lies more than ``opts.clip_sigma`` sigma *above* the running median of
    ``opts.clip_window`` pixels, with sigma the larger of the pixel's noise (``1/sqrt(ivar)``) and the local
    robust scatter (1.4826 x running median of |residual| over ``opts.clip_scatter_window`` pixels). Only
    positive residuals are tested, so absorption lines are never clipped; the local-scatter floor keeps the
    peaks between blended absorption lines of high-SNR cool stars from being taken for spikes. Masked
    pixels are bridged by linear interpolation before filtering. The mask is grown by ``opts.clip_grow``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = ivar > 0
    n = flux.size
    if np.count_nonzero(good) < opts.clip_window:
        return np.zeros(n, dtype=bool)
    if good.all():
        filled = flux
    else:
        idx = np.arange(n)
        filled = np.interp(idx, idx[good], flux[good])
    med = median_filter(filled, size=opts.clip_window, mode="nearest")
    resid = filled - med
    scatter = 1.4826 * median_filter(np.abs(resid), size=opts.clip_scatter_window, mode="nearest")
    with np.errstate(divide="ignore"):
        noise = np.where(good, 1.0 / np.sqrt(np.where(good, ivar, 1.0)), np.inf)
    spikes = good & (resid > opts.clip_sigma * np.maximum(noise, scatter))
    if opts.clip_grow and spikes.any():
        spikes = maximum_filter1d(spikes.view(np.uint8), size=2 * opts.clip_grow + 1).astype(bool)
    return spikes


def clean(spec: Spectrum, opts: PreprocessOptions) -> Spectrum:
    """Zero the inverse variance of unusable pixels; keep every pixel so the grid is unchanged.

    Pixels with ``ivar <= 0``, non-finite flux or ivar, or any of ``opts.bad_mask_bits`` set in the chosen
    mask (``opts.mask_source``) get ``ivar = 0`` (non-finite flux becomes 0). Then cosmic-ray spikes and sky
    residuals found by :func:`find_spikes` get ``ivar = 0``. Deterministic; the input is not modified.

    Returns
    -------
    Spectrum
        A new spectrum (float64 flux/ivar, masks and a copy of ``meta`` carried over).
    """
    wave = np.asarray(spec.wavelength, dtype=np.float64)
    flux = np.array(spec.flux, dtype=np.float64)
    ivar = np.array(spec.ivar, dtype=np.float64)
    bad = _bad_pixels(spec, opts)
    flux[~np.isfinite(flux)] = 0.0
    ivar[bad] = 0.0
    ivar[find_spikes(flux, ivar, opts)] = 0.0
    return Spectrum(wave, flux, ivar, np.asarray(spec.andmask), np.asarray(spec.ormask), meta=dict(spec.meta))
