"""Step 6: quality: measured SNR and the fraction of pixels with data."""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------------------------------ 6. SNR


def measure_snr(flux: np.ndarray, ivar: np.ndarray) -> tuple[float, float]:
    """Two SNR estimates over good (``ivar > 0``) pixels.

    Returns
    -------
    snr_ivar : float
        Median of ``flux * sqrt(ivar)``: the SNR the pipeline's error model claims.
    snr_der : float
        DER_SNR (Stoehr et al. 2008): ``median(flux) / (1.482602 / sqrt(6) * median |2 f_i - f_{i-2} -
        f_{i+2}|)`` over the good pixels taken in order; independent of ``ivar``, so it checks it.
        NaN with fewer than 5 good pixels; ``snr_ivar`` is NaN with none.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    if not good.any():
        return float("nan"), float("nan")
    fg = flux[good]
    snr_ivar = float(np.median(fg * np.sqrt(ivar[good])))
    if fg.size < 5:
        return snr_ivar, float("nan")
    noise = 0.6052697 * np.median(np.abs(2.0 * fg[2:-2] - fg[:-4] - fg[4:]))
    signal = float(np.median(fg))
    snr_der = signal / noise if noise > 0 else float("inf")
    return snr_ivar, float(snr_der)


def good_fraction(ivar: np.ndarray) -> float:
    """Fraction of pixels with finite ``ivar > 0`` (0 for an empty array)."""
    ivar = np.asarray(ivar)
    if ivar.size == 0:
        return 0.0
    return float(np.count_nonzero((ivar > 0) & np.isfinite(ivar)) / ivar.size)
