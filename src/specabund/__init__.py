"""specabund: stellar element abundances from LAMOST low-resolution spectra."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
