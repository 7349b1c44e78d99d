"""Label names: normalisation of user spellings to the ``C_FE`` form, label kinds and validation.

Canonical names are upper case with ``_`` for ``/``: ``C_FE`` ([C/Fe]), ``MG_H`` ([Mg/H]), ``FE_H``
([Fe/H]), ``M_H`` ([M/H]), ``ALPHA_M`` ([alpha/M]), ``ALPHA_FE``, ``TEFF``, ``LOGG``. Any other numeric
column a user names is a label too (for example ``VMIC``); it keeps its upper-cased name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import ConfigError

#: Element symbols whose [X/Fe] specabund knows (upper case).
KNOWN_ELEMENTS: tuple[str, ...] = (
    "LI", "C", "N", "O", "NA", "MG", "AL", "SI", "S", "K", "CA", "SC", "TI", "V", "CR", "MN", "CO",
    "NI", "CU", "ZN", "RB", "SR", "Y", "ZR", "BA", "LA", "CE", "PR", "ND", "SM", "EU",
)  # fmt: skip

#: Stellar parameters carried as labels beside the abundances.
STELLAR_PARAMETERS: tuple[str, ...] = ("TEFF", "LOGG", "FE_H")

_ALIASES = {
    "TEFF": "TEFF",
    "T_EFF": "TEFF",
    "LOGG": "LOGG",
    "LOG_G": "LOGG",
    "FE_H": "FE_H",
    "FEH": "FE_H",
    "MH": "M_H",
    "ALPHAM": "ALPHA_M",
    "ALPHAFE": "ALPHA_FE",
}

#: Plausible range of each label (inclusive), by name or by the wildcards ``*_FE``, ``*_M``, ``*_H``
#: (matched by suffix when the name itself has no entry). Values outside are masked (NaN) when a catalogue
#: is read; ``data.label_ranges`` in the configuration overrides entries. Labels with no entry (e.g. a
#: user-named ``VMIC``) are only checked for sentinels and finiteness.
DEFAULT_LABEL_RANGES: dict[str, tuple[float, float]] = {
    "TEFF": (2500.0, 50000.0),
    "LOGG": (-1.0, 6.0),
    "FE_H": (-5.0, 1.5),
    "M_H": (-5.0, 1.5),
    "*_FE": (-3.0, 4.0),
    "*_M": (-3.0, 4.0),
    "*_H": (-5.0, 2.0),
}

_TOKEN = re.compile(r"^[A-Z][A-Z0-9]*$")

#: Stable element symbols up to uranium, plus Th and U (recognising ``<X>_H`` and ``<X>_M`` columns; the
#: short-lived ones are left out so that columns such as ``ra_h`` are not taken for [Ra/H]).
_ALL_ELEMENTS = frozenset(
    """H HE LI BE B C N O F NE NA MG AL SI P S CL AR K CA SC TI V CR MN FE CO NI CU ZN GA GE AS SE BR KR
    RB SR Y ZR NB MO RU RH PD AG CD IN SN SB TE I XE CS BA LA CE PR ND SM EU GD TB DY HO ER TM YB
    LU HF TA W RE OS IR PT AU HG TL PB BI TH U""".split()
)


def normalize_label(name: str) -> str:
    """Return the canonical spelling of a label.

    Accepts ``c_fe``, ``C_FE``, ``[C/Fe]``, ``C/Fe``, ``c`` (an element symbol alone means [X/Fe]),
    ``teff``, ``logg``, ``feh``/``fe_h``/``[Fe/H]``, ``m_h``/``[M/H]`` (its own label, not [Fe/H]),
    ``alpha_m``/``[alpha/M]``, ``alpha_fe``/``[alpha/Fe]``. Unknown names are returned upper-cased
    (validation against the available labels is :func:`resolve_labels`' job).
    """
    s = str(name).strip().upper()
    s = s.replace("[", "").replace("]", "").replace("/", "_").replace("-", "_").replace(" ", "")
    s = re.sub(r"_+", "_", s)
    if s in _ALIASES:
        return _ALIASES[s]
    if s in KNOWN_ELEMENTS:
        return f"{s}_FE"
    return s


def is_abundance(name: str) -> bool:
    """True for ``X_FE`` labels (including unknown element symbols)."""
    return normalize_label(name).endswith("_FE")


def element_of_label(label: str) -> str | None:
    """The element whose lines measure ``label``: ``'MG'`` for ``MG_FE``, ``'FE'`` for ``FE_H``.

    ``FE_H`` is iron's own abundance, so its element is ``'FE'``; ``TEFF``, ``LOGG`` and other labels
    with no element of their own give ``None``.

    Parameters
    ----------
    label : str
        Label (any spelling accepted by :func:`normalize_label`).

    Returns
    -------
    str or None
        Upper-case element symbol, or None.
    """
    lab = normalize_label(label)
    if lab == "FE_H":
        return "FE"
    if lab.endswith("_FE") and len(lab) > len("_FE"):
        return lab[: -len("_FE")]
    return None


def _species_known(species: str) -> bool:
    """True for an element symbol, optionally followed by an ionisation stage (``TI2``, ``TIII``, ``CI``)."""
    for k in (2, 1):
        if species[:k] in _ALL_ELEMENTS and re.fullmatch(r"(I+|\d+)?", species[k:]):
            return True
    return False


def label_kind(name: str) -> str | None:
    """Kind of a label that a catalogue column of this name is recognised as, without being asked for.

    Returns
    -------
    str or None
        ``'parameter'`` for ``TEFF``, ``LOGG``, ``FE_H`` (auxiliary outputs by default); ``'abundance'``
        for ``<X>_FE`` (any single-token species, including ``ALPHA_FE`` and unknown symbols),
        ``<X>_H`` and ``<X>_M`` for known elements (with ionisation stage), ``M_H`` and ``ALPHA_M``;
        ``None`` for anything else (such a column is a label only when the user names it).
    """
    lab = normalize_label(name)
    if lab in STELLAR_PARAMETERS:
        return "parameter"
    species, sep, ref = lab.rpartition("_")
    if not sep or not _TOKEN.match(species):
        return None
    if ref == "FE" and species != "FE":
        return "abundance"
    if ref in ("H", "M") and (species in ("M", "ALPHA") or _species_known(species)):
        return None if (ref, species) == ("M", "M") else "abundance"
    return None


def label_range(
    name: str, ranges: dict[str, tuple[float, float]] | None = None
) -> tuple[float, float] | None:
    """The plausible ``(low, high)`` of a label: its own entry, else the wildcard of its suffix, else None.

    Parameters
    ----------
    name : str
        Label (any spelling).
    ranges : dict, optional
        Table like :data:`DEFAULT_LABEL_RANGES` (default: that table).
    """
    table = DEFAULT_LABEL_RANGES if ranges is None else ranges
    lab = normalize_label(name)
    if lab in table:
        return table[lab]
    if label_kind(lab) == "abundance":
        for suffix in ("_FE", "_M", "_H"):
            if lab.endswith(suffix) and f"*{suffix}" in table:
                return table[f"*{suffix}"]
    return None


def split_values(values: Iterable[str]) -> list[str]:
    """Flatten values given as several arguments and/or comma-separated lists; drop empties."""
    out: list[str] = []
    for v in values:
        out.extend(p for p in re.split(r"[,\s]+", str(v)) if p)
    return out


def resolve_labels(
    requested: Sequence[str] | None, available: Sequence[str], what: str = "labels"
) -> list[str]:
    """Normalise ``requested`` and check each is in ``available``.

    ``None`` or empty means every available label. Duplicates are dropped (first kept).

    Raises
    ------
    ConfigError
        When a requested label is unknown or absent, listing the valid ones.
    """
    avail = [normalize_label(a) for a in available]
    if not requested:
        return list(dict.fromkeys(avail))
    out: list[str] = []
    for raw in split_values(requested):
        lab = normalize_label(raw)
        if lab not in avail:
            kind = (
                "unknown element"
                if lab.endswith("_FE") and lab[:-3] not in KNOWN_ELEMENTS
                else "not available"
            )
            raise ConfigError(
                f"{raw!r} ({lab}): {kind} in the {what}; valid choices: {', '.join(avail) or '(none)'}"
            )
        if lab not in out:
            out.append(lab)
    return out
