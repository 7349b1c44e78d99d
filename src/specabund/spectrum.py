"""The in-memory spectrum container shared by readers, simulator and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Spectrum:
    """A one-dimensional spectrum with per-pixel inverse variance and masks.

    Attributes
    ----------
    wavelength : ndarray of float64, shape (n,)
        Vacuum wavelength in Angstrom, strictly increasing.
    flux : ndarray of float64, shape (n,)
        Flux (arbitrary units for LAMOST, 1e-17 erg/s/cm2/A nominally).
    ivar : ndarray of float64, shape (n,)
        Inverse variance of ``flux``; 0 marks pixels without information.
    andmask, ormask : ndarray of int32, shape (n,)
        LAMOST pixel mask bits (AND and OR over the exposures).
    meta : dict
        Header metadata: ``obsid``, ``filename``, ``class``, ``subclass``, ``z``, ``z_err``,
        ``snr_u`` .. ``snr_z``, ``data_release``, ``layout``, ``path``. Missing values are ``None``.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    andmask: np.ndarray
    ormask: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.wavelength)
        for name in ("flux", "ivar", "andmask", "ormask"):
            arr = getattr(self, name)
            if len(arr) != n:
                raise ValueError(f"Spectrum.{name} has length {len(arr)}, wavelength has {n}")

    def __len__(self) -> int:
        return len(self.wavelength)
