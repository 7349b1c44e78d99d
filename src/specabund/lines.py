"""The line list (``specabund/data/linelist.csv``) and the air/vacuum wavelength conversions.

Shared reference data of the foundation layer: the list holds absorption lines and molecular band heads at
vacuum wavelengths. It drives the simulator (:mod:`specabund.simulate`), tells the Cannon baseline which
pixels an element may use (:mod:`specabund.baselines`) and names the regions a model relies on
(:mod:`specabund.analysis`).
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["LINELIST_COLUMNS", "air_to_vacuum", "load_linelist", "vacuum_to_air"]

#: Columns of the line list, in file order.
LINELIST_COLUMNS: tuple[str, ...] = (
    "species", "element", "ion", "wavelength", "wavelength_air", "kind", "loggf", "chi_ev", "log_damping",
    "window", "log_strength", "band_length", "band_direction", "partner", "n_atoms", "theta_coeff",
    "logg_coeff", "source",
)  # fmt: skip


def air_to_vacuum(wavelength_air: np.ndarray | float) -> np.ndarray | float:
    """Convert standard-air wavelengths (Angstrom) to vacuum.

    Uses the refractive index of Morton (2000, ApJS 130, 403) / Ciddor (1996) in the inverse form given by
    N. Piskunov for VALD, valid from the near UV to the near IR.

    Parameters
    ----------
    wavelength_air : float or ndarray
        Air wavelength in Angstrom.

    Returns
    -------
    float or ndarray
        Vacuum wavelength in Angstrom.
    """
    w = np.asarray(wavelength_air, dtype=float)
    s2 = (1e4 / w) ** 2
    n = (
        1.0
        + 8.336624212083e-5
        + 2.408926869968e-2 / (130.1065924522 - s2)
        + 1.599740894897e-4 / (38.92568793293 - s2)
    )
    out = w * n
    return float(out) if out.ndim == 0 else out


def vacuum_to_air(wavelength_vacuum: np.ndarray | float) -> np.ndarray | float:
    """Convert vacuum wavelengths (Angstrom) to standard air (Morton 2000, eq. 3).

    Parameters
    ----------
    wavelength_vacuum : float or ndarray
        Vacuum wavelength in Angstrom.

    Returns
    -------
    float or ndarray
        Air wavelength in Angstrom.
    """
    w = np.asarray(wavelength_vacuum, dtype=float)
    s2 = (1e4 / w) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    out = w / n
    return float(out) if out.ndim == 0 else out


@functools.lru_cache(maxsize=1)
def _read_linelist() -> pd.DataFrame:
    ref = resources.files("specabund").joinpath("data/linelist.csv")
    with ref.open("r", encoding="utf-8") as fh:
        # keep_default_na=False: the sodium symbol 'NA' must not become NaN
        df = pd.read_csv(
            fh,
            comment="#",
            keep_default_na=False,
            na_values=[""],
            dtype={"species": str, "element": str, "partner": str, "source": str, "band_direction": str},
        )
    for col in ("partner", "band_direction"):
        df[col] = df[col].fillna("")
    df["n_atoms"] = df["n_atoms"].astype(int)
    return df


def load_linelist(kind: str | None = None, elements: list[str] | None = None) -> pd.DataFrame:
    """Load the line list shipped with specabund.

    Parameters
    ----------
    kind : {'atomic', 'molecular_band'}, optional
        Keep only this kind of feature.
    elements : list of str, optional
        Keep only features of these elements (upper-case symbols such as ``'MG'``; case-insensitive).
        A molecular band belongs to its ``element`` and to its ``partner``.

    Returns
    -------
    DataFrame
        One row per line or band head, sorted by vacuum ``wavelength`` (Angstrom), with the columns
        listed in :data:`LINELIST_COLUMNS`. ``species`` is e.g. ``'Mg I'`` or ``'CH'``, ``element`` the
        upper-case symbol (``'MG'``, ``'C'``, ``'H'``), ``kind`` ``'atomic'`` or ``'molecular_band'`` and
        ``source`` the compilation the wavelength comes from. A fresh copy is returned on each call.
    """
    df = _read_linelist().copy()
    if kind is not None:
        if kind not in ("atomic", "molecular_band"):
            raise ValueError(f"kind must be 'atomic' or 'molecular_band', not {kind!r}")
        df = df[df["kind"] == kind]
    if elements is not None:
        want = {e.strip().upper() for e in elements}
        df = df[df["element"].str.upper().isin(want) | df["partner"].str.upper().isin(want)]
    return df.reset_index(drop=True)
