"""Step 2 (optional): denoising with a Hamming-windowed sinc low-pass filter."""

from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import minimum_filter1d

from ...errors import ConfigError
from ..options import PreprocessOptions

# --------------------------------------------------------------------------------------------- 2. denoise


@functools.lru_cache(maxsize=8)
def lowpass_kernel(taps: int, cutoff: float) -> np.ndarray:
    """Hamming-windowed sinc low-pass FIR kernel (unit sum, symmetric; as ``scipy.signal.firwin``).

    ``cutoff`` is the -6 dB frequency in units of the Nyquist frequency (0.5 cycles per pixel).
    """
    j = np.arange(taps, dtype=np.float64) - (taps - 1) / 2.0
    h = cutoff * np.sinc(cutoff * j) * np.hamming(taps)
    h /= h.sum()
    h.flags.writeable = False
    return h


def denoise(flux: np.ndarray, ivar: np.ndarray, opts: PreprocessOptions) -> tuple[np.ndarray, np.ndarray]:
    """Linear-phase low-pass filter that leaves lines at the LAMOST resolution unchanged.

    Each pixel whose ``opts.denoise_taps`` neighbours are all good is replaced by the convolution of the
    flux with :func:`lowpass_kernel` (``opts.denoise_cutoff`` x Nyquist); its new ivar is the exact
    ``1 / sum(h_j^2 / ivar_j)``. Pixels near masked data keep their value and ivar; masked pixels stay
    masked, so nothing is in-painted.

    Why this filter: at R ~ 1800 the LSF has a FWHM of only ~2.4 pixels, so lines carry power up to ~0.35
    cycles/pixel while white noise is flat to 0.5. Any kernel that removes much noise removes line power
    too. Measured on a noiseless Gaussian line (FWHM 2.41 px, depth 0.5) at 11 sub-pixel offsets, fitted
    with a Gaussian, for the default 15 taps / cutoff 0.75: centre shift < 3e-4 px, FWHM change 1.6 %,
    noise scatter x 0.83. Alternatives measured the same way: an ivar-weighted Gaussian kernel must have
    sigma < 0.2 px to broaden the line by < 2 % (i.e. it does nothing); Savitzky-Golay filters preserve
    centroids but change the fitted FWHM by 3-14 % (window 5/order 2: 14 %, 7/4: 7 %, 13/10: 2.3 %).
    The gain is modest by necessity. The filtered noise is correlated between neighbouring pixels, which
    per-pixel ivar cannot express, so the step is off by default.

    Returns
    -------
    flux, ivar : ndarray of float64
    """
    if opts.denoise_method != "lowpass":  # pragma: no cover - options validation forbids it
        raise ConfigError(f"denoise_method must be 'lowpass', got {opts.denoise_method!r}")
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    h = lowpass_kernel(opts.denoise_taps, opts.denoise_cutoff)
    good = (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux)
    f = np.where(good, flux, 0.0)
    with np.errstate(divide="ignore"):
        var = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)
    ok = minimum_filter1d(good.view(np.uint8), size=h.size, mode="constant", cval=0).astype(bool)
    smooth = np.convolve(f, h, mode="same")
    svar = np.convolve(var, h * h, mode="same")
    out_flux = np.where(ok, smooth, flux)
    out_ivar = np.where(good, ivar, 0.0)
    np.divide(1.0, svar, out=out_ivar, where=ok & (svar > 0))
    return out_flux, out_ivar
