"""Naming the wavelength regions a model relies on with the line list shipped with specabund.

The line list is :func:`specabund.lines.load_linelist` (vacuum wavelengths; atomic wavelengths from the
NIST Atomic Spectra Database, molecular band heads from Pearse & Gaydon; the ``source`` column of every
row says where it comes from, see ``specabund/data/linelist.csv``).

An importance spectrum (mean absolute attribution per pixel) is split into

* the **own** part: pixels within ``half_width`` Angstrom of a line of the label's element (atomic lines
  of any ionisation stage, and the extent of molecular bands that contain the element);
* the **other** part: pixels within ``half_width`` of a line of another species (and not own);
* the **unassigned** part: everything else (continuum, wings of broad lines, features missing from the
  list).

Comparing the own fraction with the fraction of pixels that are "own" (the chance level if the importance
were spread uniformly) says whether the element's own lines drive the prediction or whether the model leans
on lines of other species -- which for data-driven abundances usually means astrophysical correlations
between labels in the training set (e.g. [Mg/Fe] learned from [Fe/H]-sensitive Fe lines).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..elements import element_of_label
from ..lines import load_linelist

__all__ = [
    "Explanation",
    "explain_importance",
    "explanation_text",
    "feature_extents",
    "linelist_sources",
    "lines_in_region",
    "own_line_mask",
    "telluric_note",
]

#: Fractions of the importance on the element's own lines above which the verdict says they dominate /
#: contribute substantially.
DOMINANT_FRACTION = 0.5
SUBSTANTIAL_FRACTION = 0.25


def feature_extents(linelist: pd.DataFrame, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Wavelength interval covered by each row of ``linelist``.

    Atomic lines cover ``wavelength +- half_width``; molecular bands run from the band head over
    ``band_length`` towards ``band_direction`` (plus ``half_width`` on both sides).
    """
    wav = linelist["wavelength"].to_numpy(dtype=float)
    lo = wav - half_width
    hi = wav + half_width
    if "kind" in linelist:
        band = (linelist["kind"] == "molecular_band").to_numpy()
        length = pd.to_numeric(linelist.get("band_length"), errors="coerce").fillna(0.0).to_numpy()
        blue = (linelist.get("band_direction", pd.Series("", index=linelist.index)) == "blue").to_numpy()
        lo = np.where(band & blue, wav - length - half_width, lo)
        hi = np.where(band & ~blue, wav + length + half_width, hi)
    return lo, hi


def _mask_of(wavelength: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    mask = np.zeros(wavelength.shape, dtype=bool)
    for a, b in zip(lo, hi, strict=True):
        i0, i1 = np.searchsorted(wavelength, [a, b])
        mask[i0:i1] = True
    return mask


def own_line_mask(wavelength: np.ndarray, element: str, half_width: float) -> np.ndarray:
    """Pixels of ``wavelength`` within ``half_width`` A of ``element``'s lines (or inside its bands)."""
    ll = load_linelist(elements=[element])
    lo, hi = feature_extents(ll, half_width)
    return _mask_of(np.asarray(wavelength, dtype=float), lo, hi)


def _species_labels(linelist: pd.DataFrame) -> list[str]:
    return [str(s) for s in linelist["species"]]


def lines_in_region(
    wave_start: float,
    wave_end: float,
    centre: float,
    linelist: pd.DataFrame,
    pad: float,
    max_lines: int = 6,
) -> list[dict[str, Any]]:
    """Known lines touching ``[wave_start - pad, wave_end + pad]``, nearest to ``centre`` first.

    When none does, the single nearest line is returned with ``inside=False``. Each entry has
    ``species``, ``element``, ``wavelength`` (vacuum A), ``kind``, ``distance`` (A from ``centre``,
    0 inside a band) and ``inside``.
    """
    if linelist.empty:
        return []
    lo, hi = feature_extents(linelist, 0.0)
    touch = (hi >= wave_start - pad) & (lo <= wave_end + pad)
    wav = linelist["wavelength"].to_numpy(dtype=float)
    dist = np.where(
        (lo <= centre) & (centre <= hi), 0.0, np.minimum(np.abs(lo - centre), np.abs(hi - centre))
    )
    rows = np.flatnonzero(touch)
    inside = True
    if rows.size == 0:
        rows = np.array([int(np.argmin(dist))])
        inside = False
    is_band = (linelist["kind"] == "molecular_band").to_numpy()
    rows = rows[np.lexsort((dist[rows], is_band[rows]))][:max_lines]  # atomic lines first, nearest first
    out = []
    for i in rows:
        r = linelist.iloc[int(i)]
        out.append(
            {
                "species": str(r["species"]),
                "element": str(r["element"]),
                "wavelength": float(wav[i]),
                "kind": str(r["kind"]),
                "distance": float(dist[i]),
                "inside": inside,
            }
        )
    return out


#: Telluric absorption bands (observed frame, vacuum A). In the rest frame they move with each star's RV
#: (+-300 km/s shifts them by up to ~0.1%), so a region near them may be telluric rather than stellar.
TELLURIC_BANDS: tuple[tuple[float, float, str], ...] = (
    (6867.0, 6884.0, "O2 B band"),
    (7160.0, 7340.0, "H2O"),
    (7594.0, 7621.0, "O2 A band"),
    (8130.0, 8350.0, "H2O"),
    (8950.0, 9100.0, "H2O"),
)


def telluric_note(wave_start: float, wave_end: float, rv_margin: float = 1e-3) -> str:
    """``'telluric O2 A band?'`` when ``[wave_start, wave_end]`` overlaps a telluric band widened by
    ``rv_margin`` (fractional, for the stars' radial velocities); ``''`` otherwise."""
    names = [
        name
        for lo, hi, name in TELLURIC_BANDS
        if wave_end >= lo * (1 - rv_margin) and wave_start <= hi * (1 + rv_margin)
    ]
    return f"telluric {' / '.join(names)}?" if names else ""


def format_lines(lines: list[dict[str, Any]]) -> str:
    """``'Mg I 5174.12; Fe I 5169.03'`` (band heads marked, far lines marked as nearest)."""
    parts = []
    for ln in lines:
        s = f"{ln['species']} {ln['wavelength']:.2f}"
        if ln["kind"] == "molecular_band":
            s += " (band head)"
        if not ln["inside"]:
            s = f"none listed; nearest {s} ({ln['distance']:.1f} A away)"
        parts.append(s)
    return "; ".join(parts)


def linelist_sources() -> list[str]:
    """Distinct ``source`` entries of the shipped line list (for citing it)."""
    src = load_linelist()["source"].dropna().astype(str)
    # 'NIST ASD (H I, Wiese & Fuhr 2009) Hbeta' -> one entry per compilation, not per line
    return sorted({re.sub(r"\)\s+\w+$", ")", s) for s in src})


@dataclass
class Explanation:
    """How an importance spectrum splits between the element's own lines and other species.

    Attributes
    ----------
    label, element : str
        The label and its element (``None`` for Teff/logg).
    half_width : float
        Half-width (A) around a line within which a pixel counts as belonging to it.
    own_fraction, other_fraction, unassigned_fraction : float
        Fractions of the summed importance on own lines, on other species' lines, elsewhere.
    own_pixel_fraction : float
        Fraction of pixels that are own (the own fraction expected if importance were uniform).
    enrichment : float
        ``own_fraction / own_pixel_fraction``.
    species_fractions : dict
        Importance fraction per species (each pixel goes to its nearest line within ``half_width``).
    verdict : str
        One-sentence conclusion.
    """

    label: str
    element: str | None
    half_width: float
    own_fraction: float
    other_fraction: float
    unassigned_fraction: float
    own_pixel_fraction: float
    enrichment: float
    species_fractions: dict[str, float] = field(default_factory=dict)
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "element": self.element,
            "half_width": self.half_width,
            "own_fraction": self.own_fraction,
            "other_fraction": self.other_fraction,
            "unassigned_fraction": self.unassigned_fraction,
            "own_pixel_fraction": self.own_pixel_fraction,
            "enrichment": self.enrichment,
            "species_fractions": dict(self.species_fractions),
            "verdict": self.verdict,
        }


def _nearest_species(wavelength: np.ndarray, linelist: pd.DataFrame, half_width: float) -> np.ndarray:
    """Species of the nearest feature within ``half_width`` for each pixel ('' when none)."""
    out = np.full(wavelength.shape, "", dtype=object)
    best = np.full(wavelength.shape, np.inf)
    lo, hi = feature_extents(linelist, half_width)
    species = _species_labels(linelist)
    wav = linelist["wavelength"].to_numpy(dtype=float)
    for k in range(len(linelist)):
        i0, i1 = np.searchsorted(wavelength, [lo[k], hi[k]])
        if i1 <= i0:
            continue
        w = wavelength[i0:i1]
        if linelist["kind"].iloc[k] == "molecular_band":
            d = np.full(w.shape, half_width)  # a band is a weak claim next to an atomic line centre
        else:
            d = np.abs(w - wav[k])
        better = d < best[i0:i1]
        best[i0:i1] = np.where(better, d, best[i0:i1])
        out[i0:i1] = np.where(better, species[k], out[i0:i1])
    return out


def _verdict(label: str, element: str | None, own: float, chance: float, top_other: list[str]) -> str:
    others = ", ".join(top_other[:3]) or "other species"
    fe_note = ""
    if element not in (None, "FE") and any(sp.startswith("Fe ") for sp in top_other[:3]):
        fe_note = (
            " Part of the weight on Fe lines is expected: [X/Fe] is a ratio, so the model needs the iron "
            "abundance too."
        )
    if element is None:
        return (
            f"{label} is a stellar parameter without lines of its own: the model reads it from {others} "
            "(expected: Teff and logg act on every line)."
        )
    enrich = own / chance if chance > 0 else math.inf
    if own >= DOMINANT_FRACTION:
        return (
            f"The element's own lines dominate: {own:.0%} of the importance lies within the {element} lines "
            f"({enrich:.1f}x the {chance:.0%} expected by chance)." + fe_note
        )
    if own >= SUBSTANTIAL_FRACTION or (enrich >= 3.0 and own >= 0.1):
        return (
            f"The {element} lines contribute substantially ({own:.0%} of the importance, "
            f"{enrich:.1f}x chance), but the model also leans on lines of other species ({others}): "
            "blends or astrophysical "
            "correlations between labels, a known weakness of data-driven abundances." + fe_note
        )
    return (
        f"The model leans on lines of other species ({others}); only {own:.0%} of the importance lies on "
        f"{element} lines ({enrich:.1f}x chance). The prediction is likely driven by astrophysical "
        "correlations with other labels (a known weakness of data-driven abundances) rather than by the "
        f"{element} lines themselves." + fe_note
    )


def explain_importance(
    label: str,
    wavelength: np.ndarray,
    importance: np.ndarray,
    half_width: float = 3.0,
) -> Explanation:
    """Split an importance spectrum into own lines, other species and unassigned pixels.

    Parameters
    ----------
    label : str
        The predicted label (``MG_FE``, ``FE_H``, ``TEFF``...).
    wavelength : ndarray
        ``(P,)`` vacuum wavelengths (A), increasing.
    importance : ndarray
        ``(P,)`` non-negative importance per pixel (e.g. mean absolute attribution).
    half_width : float
        Half-width (A) around a line within which a pixel counts as that line's.

    Returns
    -------
    Explanation
    """
    wl = np.asarray(wavelength, dtype=float)
    imp = np.clip(np.nan_to_num(np.asarray(importance, dtype=float)), 0.0, None)
    total = float(imp.sum())
    element = element_of_label(label)
    ll = load_linelist()
    ll = ll[(ll["wavelength"] > wl[0] - 100.0) & (ll["wavelength"] < wl[-1] + 100.0)].reset_index(drop=True)
    nearest = _nearest_species(wl, ll, half_width)
    any_line = nearest != ""
    if element is not None:
        own = own_line_mask(wl, element, half_width)
    else:
        own = np.zeros(wl.shape, dtype=bool)
    frac = (lambda m: float(imp[m].sum()) / total) if total > 0 else (lambda m: float("nan"))
    own_f = frac(own)
    other_f = frac(any_line & ~own)
    unassigned_f = frac(~any_line & ~own)
    chance = float(own.mean()) if own.size else 0.0
    species: dict[str, float] = {}
    if total > 0:
        for sp in sorted(set(nearest[any_line])):
            species[str(sp)] = float(imp[nearest == sp].sum()) / total
    species = dict(sorted(species.items(), key=lambda kv: -kv[1]))
    own_species = set()
    if element is not None:
        own_species = set(load_linelist(elements=[element])["species"].astype(str))
    top_other = [sp for sp in species if sp not in own_species]
    if element is None:
        top_other = list(species)
    enrichment = own_f / chance if chance > 0 and np.isfinite(own_f) else float("nan")
    return Explanation(
        label=label,
        element=element,
        half_width=float(half_width),
        own_fraction=own_f,
        other_fraction=other_f,
        unassigned_fraction=unassigned_f,
        own_pixel_fraction=chance,
        enrichment=enrichment,
        species_fractions=species,
        verdict=_verdict(label, element, own_f if np.isfinite(own_f) else 0.0, chance, top_other),
    )


def explanation_text(
    explanation: Explanation,
    regions: pd.DataFrame,
    title: str | None = None,
    notes: list[str] | None = None,
) -> str:
    """Plain-text explanation: the verdict, the top regions with their lines, the species breakdown.

    Parameters
    ----------
    explanation : Explanation
        From :func:`explain_importance`.
    regions : DataFrame
        Top regions (``rank, wave_start, wave_end, importance, lines``).
    title : str, optional
        First line.
    notes : list of str, optional
        Extra lines (attribution settings, convergence, cross-checks) printed before the sources.
    """
    e = explanation
    out = [title or f"{e.label}: which wavelengths drive the prediction", ""]
    out.append("Verdict: " + e.verdict)
    out.append("")
    if e.element is not None:
        out.append(
            f"Importance within +-{e.half_width:g} A of {e.element} lines (or inside its molecular bands): "
            f"{e.own_fraction:.1%} (these pixels are {e.own_pixel_fraction:.1%} of the spectrum: "
            f"enrichment {e.enrichment:.2f}x)"
        )
    out.append(f"Importance on lines of other species: {e.other_fraction:.1%}")
    out.append(f"Importance away from any listed line: {e.unassigned_fraction:.1%}")
    out.append("")
    out.append("Top regions (importance = fraction of the summed mean |attribution|):")
    own_species: set[str] = set()
    if e.element is not None:
        own_species = set(load_linelist(elements=[e.element])["species"].astype(str))
    for r in regions.itertuples(index=False):
        lines = str(r.lines)
        mark = ""
        if own_species and any(lines.startswith(sp + " ") or f"; {sp} " in lines for sp in own_species):
            mark = "  [own element]"
        out.append(
            f"  {int(r.rank):>2}. {r.wave_start:8.1f}-{r.wave_end:8.1f} A  {r.importance:6.1%}  {lines}{mark}"
        )
    out.append("")
    out.append("Importance by species (pixel -> nearest line within the half-width):")
    for sp, f in list(e.species_fractions.items())[:12]:
        tag = "  [own]" if sp in own_species else ""
        out.append(f"  {sp:<8} {f:6.1%}{tag}")
    if notes:
        out.append("")
        out.extend(notes)
    out.append("")
    out.append("Line list: specabund.lines.load_linelist() (vacuum wavelengths); sources:")
    out.extend(f"  - {s}" for s in linelist_sources())
    return "\n".join(out) + "\n"
