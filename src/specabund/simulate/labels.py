"""Stellar labels for the simulator: Galactic-looking populations or independent uniform draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "ABUNDANCE_ELEMENTS",
    "ALPHA_ELEMENTS",
    "INDEPENDENT_RANGES",
    "LABEL_COLUMNS",
    "abundance_columns",
    "draw_labels",
]

#: Elements whose [X/Fe] the simulator draws (upper-case symbols), in column order.
ABUNDANCE_ELEMENTS: tuple[str, ...] = (
    "C", "N", "O", "NA", "MG", "AL", "SI", "CA", "TI", "CR", "MN", "NI", "BA",
)  # fmt: skip

#: The alpha elements, which follow the [alpha/Fe]-[Fe/H] knee.
ALPHA_ELEMENTS: tuple[str, ...] = ("O", "MG", "SI", "CA", "TI")

#: Every label column :func:`draw_labels` returns by default.
LABEL_COLUMNS: tuple[str, ...] = ("teff", "logg", "fe_h", *(f"{e}_FE" for e in ABUNDANCE_ELEMENTS))

#: Ranges (low, high) of the uniform draws of ``draw_labels(..., independent=True)``.
INDEPENDENT_RANGES: dict[str, tuple[float, float]] = {
    "teff": (3900.0, 7000.0),
    "logg": (1.0, 4.8),
    "fe_h": (-2.5, 0.5),
    "C_FE": (-0.6, 0.5),
    "N_FE": (-0.4, 0.9),
    "O_FE": (-0.3, 0.7),
    "NA_FE": (-0.4, 0.5),
    "MG_FE": (-0.3, 0.6),
    "AL_FE": (-0.4, 0.6),
    "SI_FE": (-0.3, 0.6),
    "CA_FE": (-0.3, 0.5),
    "TI_FE": (-0.3, 0.5),
    "CR_FE": (-0.3, 0.3),
    "MN_FE": (-0.6, 0.3),
    "NI_FE": (-0.3, 0.3),
    "BA_FE": (-0.6, 0.9),
}

# alpha enhancement relative to Mg: [X/Fe] = scale * [alpha/Fe] (+ scatter sigma)
_ALPHA_SCALE = {
    "O": (1.25, 0.07),
    "MG": (1.0, 0.04),
    "SI": (0.8, 0.05),
    "CA": (0.7, 0.05),
    "TI": (0.65, 0.06),
}
_POPULATIONS = {  # name: (fraction, mean [Fe/H], sigma [Fe/H])
    "thin": (0.70, -0.10, 0.22),
    "thick": (0.22, -0.55, 0.25),
    "halo": (0.08, -1.50, 0.45),
}


def abundance_columns(elements: Sequence[str] | None = None) -> list[str]:
    """``X_FE`` column names for ``elements`` (default :data:`ABUNDANCE_ELEMENTS`)."""
    els = ABUNDANCE_ELEMENTS if elements is None else tuple(e.strip().upper() for e in elements)
    unknown = [e for e in els if e not in ABUNDANCE_ELEMENTS]
    if unknown:
        raise ValueError(f"unknown element(s) {unknown}; the simulator draws {', '.join(ABUNDANCE_ELEMENTS)}")
    return [f"{e}_FE" for e in els]


def _softplus(x: np.ndarray, k: float = 8.0) -> np.ndarray:
    return np.logaddexp(0.0, k * x) / k


def _alpha_high(feh: np.ndarray) -> np.ndarray:
    """[alpha/Fe] of the thick disc / halo sequence: a plateau at 0.32 below the knee at [Fe/H] ~ -0.8."""
    return 0.32 - 0.25 * _softplus(feh + 0.8)


def _alpha_low(feh: np.ndarray) -> np.ndarray:
    """[alpha/Fe] of the thin disc: ~0 at solar metallicity, slowly rising towards low [Fe/H]."""
    return 0.02 - 0.08 * feh


def _draw_galactic(n: int, rng: np.random.Generator) -> pd.DataFrame:
    names = list(_POPULATIONS)
    frac = np.array([_POPULATIONS[p][0] for p in names])
    pop = rng.choice(len(names), size=n, p=frac / frac.sum())
    mu = np.array([_POPULATIONS[p][1] for p in names])[pop]
    sd = np.array([_POPULATIONS[p][2] for p in names])[pop]
    feh = np.clip(rng.normal(mu, sd), -2.5, 0.5)
    high_alpha = pop > 0
    alpha = np.where(high_alpha, _alpha_high(feh), _alpha_low(feh)) + rng.normal(0.0, 0.03, n)

    # Teff-logg: dwarfs (main sequence + turn-off/subgiants) and giants (RGB + red clump)
    kind = rng.choice(3, size=n, p=[0.55, 0.30, 0.15])  # 0 dwarf, 1 RGB, 2 red clump
    teff = np.empty(n)
    logg = np.empty(n)
    d = kind == 0
    nd = int(d.sum())
    t_ms = rng.uniform(4000.0, 7000.0, nd) - 150.0 * feh[d]  # metal-poor dwarfs are a bit hotter
    x = np.clip((t_ms - 4000.0) / 3000.0, 0.0, None)
    g_ms = 4.70 - 0.55 * x**1.5
    evolved = rng.uniform(0.0, 1.0, nd) < 0.25 * np.minimum(x, 1.0) ** 0.5  # turn-off stars leaving the MS
    g_ms = g_ms - evolved * rng.uniform(0.2, 0.8, nd)
    teff[d] = t_ms
    logg[d] = g_ms + rng.normal(0.0, 0.08, nd)
    r = kind == 1
    nr = int(r.sum())
    g_rgb = rng.uniform(1.0, 3.5, nr)
    teff[r] = 3950.0 + 330.0 * (g_rgb - 1.0) - 160.0 * feh[r] + rng.normal(0.0, 70.0, nr)
    logg[r] = g_rgb
    c = kind == 2
    nc = int(c.sum())
    teff[c] = 4750.0 - 80.0 * feh[c] + rng.normal(0.0, 80.0, nc)
    logg[c] = rng.normal(2.45, 0.1, nc)
    teff = np.clip(teff, 3900.0, 7200.0)
    logg = np.clip(logg, 0.8, 4.9)

    out: dict[str, np.ndarray] = {"teff": teff, "logg": logg, "fe_h": feh}
    for el, (scale, sig) in _ALPHA_SCALE.items():
        out[f"{el}_FE"] = scale * alpha + rng.normal(0.0, sig, n)
    # carbon depleted and nitrogen enhanced on the upper giant branch (first dredge-up + extra mixing)
    giant_mix = _softplus(2.8 - logg, 3.0)  # ~0 for dwarfs, grows towards the RGB tip
    out["C_FE"] = 0.05 - 0.2 * giant_mix - 0.05 * feh + rng.normal(0.0, 0.08, n)
    out["N_FE"] = 0.05 + 0.25 * giant_mix + rng.normal(0.0, 0.1, n)
    out["NA_FE"] = 0.03 + 0.05 * high_alpha + 0.04 * (logg < 3.0) + rng.normal(0.0, 0.07, n)
    out["AL_FE"] = 0.6 * alpha + 0.02 + rng.normal(0.0, 0.07, n)
    out["CR_FE"] = rng.normal(0.0, 0.04, n)
    out["MN_FE"] = 0.2 * np.minimum(feh, 0.2) - 0.04 * high_alpha + rng.normal(0.0, 0.05, n)
    out["NI_FE"] = 0.03 * high_alpha + 0.03 * feh + rng.normal(0.0, 0.04, n)
    out["BA_FE"] = 0.05 - 0.15 * high_alpha + 0.05 * (feh < -0.3) + rng.normal(0.0, 0.15, n)
    df = pd.DataFrame(out)
    df["population"] = np.array(names)[pop]
    return df


def draw_labels(
    n: int,
    rng: np.random.Generator,
    independent: bool = False,
    elements: Sequence[str] | None = None,
    *,
    with_population: bool = False,
) -> pd.DataFrame:
    """Draw stellar labels.

    Parameters
    ----------
    n : int
        Number of stars.
    rng : numpy.random.Generator
        Random generator (the only source of randomness).
    independent : bool
        False (default): a Galactic-looking sample -- dwarfs on a rough main sequence (Teff 4000-7000 K,
        logg 4-4.7, with turn-off stars), red giant branch and red clump giants (Teff 4000-5200 K, logg
        1-3.5), thin disc / thick disc / halo metallicity distributions, the [alpha/Fe]-[Fe/H] knee of the
        high-alpha sequence, carbon depleted (and nitrogen enhanced) on the upper giant branch and small
        scatter for the other elements. True: every label drawn independently and uniformly over
        :data:`INDEPENDENT_RANGES`, so that a model cannot lean on correlations between labels.
    elements : sequence of str, optional
        Elements whose ``X_FE`` columns to return (default all of :data:`ABUNDANCE_ELEMENTS`).
    with_population : bool
        Add a ``population`` column (``'thin'``, ``'thick'``, ``'halo'``; ``'uniform'`` when independent).

    Returns
    -------
    DataFrame
        Columns ``teff`` (K), ``logg`` (dex, cgs), ``fe_h`` and one ``X_FE`` per element.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cols = ["teff", "logg", "fe_h", *abundance_columns(elements)]
    if independent:
        df = pd.DataFrame({c: rng.uniform(*INDEPENDENT_RANGES[c], size=n) for c in LABEL_COLUMNS})
        df["population"] = "uniform"
    else:
        df = _draw_galactic(n, rng)
    if with_population:
        cols.append("population")
    return df[cols].reset_index(drop=True)
