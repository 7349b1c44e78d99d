"""Physically grounded simulator of LAMOST low-resolution spectra (the project's ground truth).

Public API
----------
:func:`draw_labels`
    Galactic-looking or independent labels (teff, logg, fe_h and ``X_FE``).
:func:`normalized_model_flux`
    Noiseless, rest-frame, continuum-normalised model at LAMOST resolution.
:func:`simulate_spectrum`
    An observed-frame spectrum with continuum, response, reddening, tellurics, sky, noise and masks.
:func:`write_lamost_fits`
    Write a :class:`~specabund.spectrum.Spectrum` as a LAMOST FITS file (table or image layout).
:func:`simulate_dataset`
    FITS files plus reference, prediction and truth catalogues.
"""

from __future__ import annotations

from .dataset import DATASET_LAYOUTS, simulate_dataset
from .labels import ABUNDANCE_ELEMENTS, ALPHA_ELEMENTS, INDEPENDENT_RANGES, LABEL_COLUMNS, draw_labels
from .synth import (
    LAMOST_COEFF0,
    LAMOST_COEFF1,
    LAMOST_NPIX,
    MASK_BITS,
    SNR_BANDS,
    lamost_wavelength_grid,
    line_strengths,
    normalized_model_flux,
    simulate_spectrum,
    spectral_subclass,
)
from .writer import LAYOUTS, write_lamost_fits

__all__ = [
    "ABUNDANCE_ELEMENTS",
    "ALPHA_ELEMENTS",
    "DATASET_LAYOUTS",
    "INDEPENDENT_RANGES",
    "LABEL_COLUMNS",
    "LAMOST_COEFF0",
    "LAMOST_COEFF1",
    "LAMOST_NPIX",
    "LAYOUTS",
    "MASK_BITS",
    "SNR_BANDS",
    "draw_labels",
    "lamost_wavelength_grid",
    "line_strengths",
    "normalized_model_flux",
    "simulate_dataset",
    "simulate_spectrum",
    "spectral_subclass",
    "write_lamost_fits",
]
