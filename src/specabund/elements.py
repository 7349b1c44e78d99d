"""Label names: normalisation of user spellings to the ``C_FE`` form and validation."""

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
    "M_H": "FE_H",
}


def normalize_label(name: str) -> str:
    """Return the canonical spelling of a label.

    Accepts ``c_fe``, ``C_FE``, ``[C/Fe]``, ``C/Fe``, ``c`` (an element symbol alone means [X/Fe]),
    ``teff``, ``logg``, ``feh``/``fe_h``/``[Fe/H]``. Unknown names are returned upper-cased (validation
    against the available labels is :func:`resolve_labels`' job).
    """
    s = str(name).strip().upper()
    s = s.strip("[]").replace("/", "_").replace("-", "_").replace(" ", "")
    s = re.sub(r"_+", "_", s)
    if s in _ALIASES:
        return _ALIASES[s]
    if s in KNOWN_ELEMENTS:
        return f"{s}_FE"
    return s


def is_abundance(name: str) -> bool:
    """True for ``X_FE`` labels (including unknown element symbols)."""
    return normalize_label(name).endswith("_FE")


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
