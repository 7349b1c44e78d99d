"""Per-spectrum preprocessing steps, one module a step, and the chain that runs them.

1. :mod:`.cleaning` - bad pixels and spikes;
2. :mod:`.denoising` - optional low-pass filter;
3. :mod:`.rest_frame` - Doppler shift, RV refinement, the velocity check;
4. :mod:`.resampling` - the common log-linear grid;
5. :mod:`.continuum` - penalised-spline continuum and normalisation;
6. :mod:`.quality` - SNR and good-pixel fraction;
7. :mod:`.chain` - :func:`preprocess_spectrum`, steps 1-6 in order.

Every step is a small deterministic function of numpy arrays (no global state beyond read-only caches of
grids and spline bases), vectorised so that the whole chain takes about a millisecond for a 3900-pixel
LAMOST spectrum. :func:`preprocess_spectrum` chains them and never raises for a bad spectrum: it returns a
:class:`PreprocessResult` whose ``status`` says why a spectrum was rejected.

Conventions: wavelengths are vacuum Angstrom; ``ivar == 0`` marks a pixel without information (pixels are
never removed, so grids stay intact); velocities are in km/s with ``z = v / c`` (the LAMOST convention; the
relativistic correction is below 1e-6 in wavelength for |v| < 500 km/s).
"""

from __future__ import annotations

from .chain import PreprocessResult, preprocess_spectrum
from .cleaning import clean, find_spikes
from .continuum import (
    BLUE_ARM_MAX_WAVE,
    CONTINUUM_CLIP_FLOOR,
    CONTINUUM_LINE_MASK,
    CONTINUUM_MIN_PIXEL_SNR,
    TELLURIC_MASK,
    ContinuumError,
    ContinuumFit,
    blue_arm_end,
    continuum_mask,
    fit_continuum,
    fit_continuum_details,
    normalize,
)
from .denoising import denoise, lowpass_kernel
from .quality import good_fraction, measure_snr
from .resampling import log_linear_grid, pixel_edges, resample
from .rest_frame import C_KMS, refine_rv, to_rest_frame, velocity_problem

__all__ = [
    "BLUE_ARM_MAX_WAVE",
    "CONTINUUM_CLIP_FLOOR",
    "CONTINUUM_LINE_MASK",
    "CONTINUUM_MIN_PIXEL_SNR",
    "C_KMS",
    "TELLURIC_MASK",
    "ContinuumError",
    "ContinuumFit",
    "PreprocessResult",
    "blue_arm_end",
    "clean",
    "continuum_mask",
    "denoise",
    "find_spikes",
    "fit_continuum",
    "fit_continuum_details",
    "good_fraction",
    "log_linear_grid",
    "lowpass_kernel",
    "measure_snr",
    "normalize",
    "pixel_edges",
    "preprocess_spectrum",
    "refine_rv",
    "resample",
    "to_rest_frame",
    "velocity_problem",
]
