"""Readers for spectrum files."""

from __future__ import annotations

from specabund.io.lamost import FITS_SUFFIXES, LAYOUTS, iter_fits_files, read_lamost

__all__ = ["FITS_SUFFIXES", "LAYOUTS", "iter_fits_files", "read_lamost"]
