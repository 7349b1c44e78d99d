"""Label catalogues: the reference (``X_FE.csv``) and prediction (``galah_X_FE.csv``) CSV files.

A catalogue has one row per spectrum and a ``spec`` column naming it: a FITS file name with or without
``.fits``/``.fits.gz``, a path relative to the FITS directory, or a LAMOST obsid. Optional columns:
``teff``, ``logg``, ``fe_h`` (also ``feh``, ``[Fe/H]``, ``m_h``), every ``*_FE`` abundance (any case,
``[Mg/Fe]`` spellings accepted), ``rv`` (km/s; wins over the header redshift), ``snr`` and ``group``
(spectra of one star). Missing values stay NaN.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .elements import is_abundance, normalize_label, resolve_labels
from .errors import CatalogError

log = logging.getLogger(__name__)

_FITS_SUFFIX = re.compile(r"(\.(fits|fit|fts))?(\.(gz|bz2))?$", re.IGNORECASE)
_PARAM_ALIASES = {"TEFF": "teff", "LOGG": "logg", "FE_H": "fe_h"}


def spec_key(name: str) -> str:
    """Matching key of a spectrum name: base name without FITS/compression suffixes."""
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    return _FITS_SUFFIX.sub("", base)


@dataclass
class Catalog:
    """A parsed label catalogue.

    Attributes
    ----------
    path : Path
        The CSV file.
    table : DataFrame
        Columns ``spec``, ``teff``, ``logg``, ``fe_h`` (NaN when absent), each abundance in ``C_FE`` form,
        and ``rv``, ``snr``, ``group`` when given.
    elements : list of str
        The abundance columns kept (requested ones, or all found).
    """

    path: Path
    table: pd.DataFrame
    elements: list[str]

    @property
    def label_names(self) -> list[str]:
        """Abundances followed by the stellar parameters present in the file."""
        params = [p for p, col in _PARAM_ALIASES.items() if self.table[col].notna().any()]
        return [*self.elements, *params]

    def labels(self, names: list[str]) -> np.ndarray:
        """(N, len(names)) float array of the named labels (NaN when missing, also for absent columns)."""
        y = np.full((len(self.table), len(names)), np.nan)
        for j, name in enumerate(names):
            col = _PARAM_ALIASES.get(name, name)
            if col in self.table:
                y[:, j] = self.table[col].to_numpy(dtype=float)
        return y


def read_catalog(
    path: str | Path, elements: list[str] | None = None, *, require_labels: bool = True
) -> Catalog:
    """Read and normalise a label CSV.

    Parameters
    ----------
    path : path
        The CSV file.
    elements : list of str, optional
        Abundances to keep (any spelling); default: every ``*_FE`` column.
    require_labels : bool
        True for a reference catalogue: at least one requested abundance must be present.
        A prediction catalogue (False) may hold only ``spec``.

    Raises
    ------
    CatalogError
        File missing or unreadable, no ``spec`` column, no requested element (reference), or a
        requested element absent (the message lists the available ones).
    """
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: label catalogue not found")
    try:
        raw = pd.read_csv(path, dtype={"spec": str, "SPEC": str, "Spec": str}, comment=None)
    except Exception as exc:
        raise CatalogError(f"{path}: cannot read as CSV ({exc})") from exc
    cols = {c: str(c).strip() for c in raw.columns}
    raw = raw.rename(columns=cols)
    spec_cols = [c for c in raw.columns if c.lower() == "spec"]
    if not spec_cols:
        raise CatalogError(
            f"{path}: no 'spec' column (found: {', '.join(map(str, raw.columns))}); "
            "the 'spec' column names each spectrum's FITS file or obsid"
        )
    out = pd.DataFrame({"spec": raw[spec_cols[0]].astype(str).str.strip()})
    empty = out["spec"].isin(["", "nan", "None"])
    if empty.any():
        log.warning("%s: %d rows with an empty spec value dropped", path, int(empty.sum()))
        out = out[~empty]
        raw = raw.loc[out.index]

    found: dict[str, str] = {}
    for c in raw.columns:
        if c == spec_cols[0]:
            continue
        lab = normalize_label(c)
        if lab in found:
            continue
        if lab in _PARAM_ALIASES or (is_abundance(lab) and lab != "FE_H"):
            found[lab] = c
    for lab, col in _PARAM_ALIASES.items():
        out[col] = pd.to_numeric(raw[found[lab]], errors="coerce") if lab in found else np.nan
    abund = [lab for lab in found if lab.endswith("_FE") and lab not in _PARAM_ALIASES]
    if elements:
        if not abund and not require_labels:
            keep: list[str] = []
        else:
            keep = resolve_labels(elements, abund, what=f"catalogue {path.name}")
    else:
        keep = abund
    if require_labels and not keep:
        raise CatalogError(
            f"{path}: a reference catalogue needs at least one [X/Fe] column (e.g. C_FE, MG_FE); "
            f"found columns: {', '.join(map(str, raw.columns))}"
        )
    for lab in keep:
        out[lab] = pd.to_numeric(raw[found[lab]], errors="coerce")
    lower = {c.lower(): c for c in raw.columns}
    for extra in ("rv", "snr", "group"):
        if extra in lower:
            out[extra] = (
                raw[lower[extra]] if extra == "group" else pd.to_numeric(raw[lower[extra]], errors="coerce")
            )
    if "group" in out:
        out["group"] = out["group"].astype(str)
    return Catalog(path=path, table=out.reset_index(drop=True), elements=keep)


@dataclass
class MatchResult:
    """Spectra matched to catalogue rows, and what did not match.

    Attributes
    ----------
    files : list of Path
        Matched FITS files, in catalogue row order.
    rows : ndarray of int
        Catalogue row index of each matched file.
    unmatched_rows : list of (spec, reason)
        Catalogue rows without a file ('no FITS file', 'duplicate row', 'path escapes the FITS directory').
    unmatched_files : list of Path
        FITS files in the folder that no row names.
    """

    files: list[Path] = field(default_factory=list)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    unmatched_rows: list[tuple[str, str]] = field(default_factory=list)
    unmatched_files: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for _, r in self.unmatched_rows:
            reasons[r] = reasons.get(r, 0) + 1
        return {
            "matched": len(self.files),
            "unmatched_rows": len(self.unmatched_rows),
            "unmatched_files": len(self.unmatched_files),
            **{f"rows_{k.replace(' ', '_')}": v for k, v in reasons.items()},
        }


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def match_catalog(catalog: Catalog, fits_files: list[Path], fits_dir: str | Path) -> MatchResult:
    """Match catalogue rows to FITS files.

    A ``spec`` value containing a path separator is taken relative to ``fits_dir`` and must stay inside it;
    otherwise it matches a file by base name without suffixes, so ``spec-1.fits``, ``spec-1.fits.gz``
    and ``spec-1`` are the same key, and an obsid matches a file named ``<obsid>.fits``.
    """
    fits_dir = Path(fits_dir)
    by_key: dict[str, Path] = {}
    by_rel: dict[str, Path] = {}
    root = fits_dir.resolve()
    for f in fits_files:
        by_key.setdefault(spec_key(f.name), f)
        try:
            rel = f.resolve().relative_to(root).as_posix()
            by_rel[_FITS_SUFFIX.sub("", rel)] = f
        except ValueError:
            pass
    res = MatchResult()
    used: set[Path] = set()
    rows: list[int] = []
    for i, spec in enumerate(catalog.table["spec"].tolist()):
        s = spec.replace("\\", "/")
        target: Path | None
        if "/" in s:
            candidate = Path(s) if Path(s).is_absolute() else fits_dir / s
            if ".." in Path(s).parts or not _inside(candidate, fits_dir):
                res.unmatched_rows.append((spec, "path escapes the FITS directory"))
                continue
            rel = candidate.resolve().relative_to(root).as_posix()
            target = by_rel.get(_FITS_SUFFIX.sub("", rel))
        else:
            target = by_key.get(spec_key(s))
        if target is None:
            res.unmatched_rows.append((spec, "no FITS file"))
        elif target in used:
            res.unmatched_rows.append((spec, "duplicate row"))
        else:
            used.add(target)
            res.files.append(target)
            rows.append(i)
    res.rows = np.asarray(rows, dtype=int)
    res.unmatched_files = [f for f in fits_files if f not in used]
    return res
