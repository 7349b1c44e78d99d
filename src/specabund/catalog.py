"""Label catalogues: the reference (``X_FE.csv``) and prediction (``galah_X_FE.csv``) CSV files.

A catalogue has one row per spectrum and a ``spec`` column naming it: a FITS file name with or without
``.fits``/``.fits.gz``, a path relative to the FITS directory, or a LAMOST obsid. Every other column has
one of these roles (column names are matched case-insensitively; ``[Mg/Fe]`` spellings are accepted):

label
    ``teff``, ``logg``, ``fe_h`` (also ``feh``, ``[Fe/H]``): stellar parameters, auxiliary outputs by
    default; every ``<X>_FE`` (including ``alpha_fe``), ``<X>_H`` (e.g. ``mg_h``, ``m_h``) and
    ``<X>_M`` (``alpha_m``) column: abundance labels. Any other numeric column is a label when asked for
    by name (``--elements VMIC``).
error of a label
    ``<label>_err`` / ``<label>_error`` (APOGEE ``MG_FE_ERR``, LASP ``teff_err``, ``feh_err``) or
    ``e_<label>`` (GALAH ``e_mg_fe``). Carried into the dataset as ``y_err``.
flag of a label
    ``<label>_flag`` (APOGEE ``MG_FE_FLAG``) or ``flag_<label>`` (GALAH ``flag_mg_fe``): non-zero masks that
    label only.
star flag
    ``flag_sp`` (GALAH: non-zero masks every label of the row) and ``aspcapflag`` / ``aspcapflags``
    (APOGEE: the STAR_BAD bit 23, or the text ``STAR_BAD``, masks every label of the row).
other
    ``rv`` (km/s; wins over the header redshift), ``snr`` and ``group`` (spectra of one star).

Values are cleaned when read (:class:`CatalogRules`): sentinels (``-9999``, ``-999``) and non-numeric
entries become NaN, labels outside their plausible range (:data:`specabund.elements.DEFAULT_LABEL_RANGES`),
negative errors and ``|rv|`` above ``max_abs_rv_kms`` become NaN, and flagged labels become NaN unless the
flag policy is ``'keep'``. How many values each rule masked is in :attr:`Catalog.masked`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .elements import (
    DEFAULT_LABEL_RANGES,
    STELLAR_PARAMETERS,
    label_kind,
    label_range,
    normalize_label,
    split_values,
)
from .errors import CatalogError, ConfigError

log = logging.getLogger(__name__)

_FITS_SUFFIX = re.compile(r"(\.(fits|fit|fts))?(\.(gz|bz2))?$", re.IGNORECASE)
_PARAM_ALIASES = {"TEFF": "teff", "LOGG": "logg", "FE_H": "fe_h"}

#: Values that catalogues write for "no measurement" (APOGEE and LASP -9999, LASP -999).
DEFAULT_SENTINELS: tuple[float, ...] = (-9999.0, -999.0)
#: Largest plausible |radial velocity| (km/s) of a catalogue ``rv`` or a header redshift (|Z| c).
DEFAULT_MAX_ABS_RV_KMS: float = 1000.0
#: What a non-zero quality flag does: ``'mask'`` the flagged value (NaN) or ``'keep'`` it.
FLAG_POLICIES: tuple[str, ...] = ("mask", "keep")
#: Reasons a catalogue value is masked, in the order they are tested (a value counts under the first).
MASK_REASONS: tuple[str, ...] = ("non_numeric", "sentinel", "implausible", "flag")

_ERR_PREFIXES = ("E_", "ERR_")
_ERR_SUFFIXES = ("_ERR", "_ERROR")
_FLAG_PREFIXES = ("FLAG_",)
_FLAG_SUFFIXES = ("_FLAG",)
#: Whole-row quality flags: canonical column name -> how to read it.
_STAR_FLAGS = {"FLAG_SP": "nonzero", "ASPCAPFLAG": "star_bad", "ASPCAPFLAGS": "star_bad"}
_APOGEE_STAR_BAD_BIT = 23
_FALSE_TEXT = frozenset({"", "0", "false", "f", "no", "n", "nan", "none", "null"})


def spec_key(name: str) -> str:
    """Matching key of a spectrum name: base name without FITS/compression suffixes."""
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    return _FITS_SUFFIX.sub("", base)


# --------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class CatalogRules:
    """How catalogue values are cleaned when read (``[data]`` keys of the configuration).

    Attributes
    ----------
    label_ranges : dict of str to (float, float)
        Plausible ``(low, high)`` per label name or wildcard (``*_FE``, ``*_M``, ``*_H``); entries given
        here replace those of :data:`specabund.elements.DEFAULT_LABEL_RANGES`, the others keep their
        defaults. ``[-inf, inf]`` switches a range off. Labels without a range are only checked for
        sentinels and finiteness.
    sentinels : tuple of float
        Values meaning "no measurement" in labels, errors, ``rv`` and ``snr`` [(-9999, -999)].
    flag_policy : {'mask', 'keep'}
        A non-zero label flag (or a bad star flag) masks the value ('mask', default) or is ignored ('keep').
    max_abs_rv_kms : float
        Catalogue ``rv`` values with a larger modulus are masked (the header redshift is used instead) and
        header redshifts with ``|Z| c`` above it are not used [1000].
    """

    label_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    sentinels: tuple[float, ...] = DEFAULT_SENTINELS
    flag_policy: str = "mask"
    max_abs_rv_kms: float = DEFAULT_MAX_ABS_RV_KMS

    def __post_init__(self) -> None:
        if not isinstance(self.label_ranges, Mapping):
            raise ConfigError(
                f"data.label_ranges must be a table of label = [low, high], got {self.label_ranges!r}"
            )
        ranges: dict[str, tuple[float, float]] = dict(DEFAULT_LABEL_RANGES)
        for key, value in self.label_ranges.items():
            name = str(key).strip().upper() if str(key).strip().startswith("*") else normalize_label(key)
            if (
                not isinstance(value, list | tuple)
                or len(value) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
                or math.isnan(value[0])
                or math.isnan(value[1])
                or not value[0] < value[1]
            ):
                raise ConfigError(
                    f"data.label_ranges.{key} = {value!r}; need [low, high] with low < high "
                    "(use -inf/inf for no limit)"
                )
            ranges[name] = (float(value[0]), float(value[1]))
        object.__setattr__(self, "label_ranges", ranges)
        sent = self.sentinels
        if isinstance(sent, str) or not isinstance(sent, list | tuple):
            raise ConfigError(f"data.sentinels must be a list of numbers, got {sent!r}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in sent):
            raise ConfigError(f"data.sentinels must be finite numbers, got {list(sent)!r}")
        object.__setattr__(self, "sentinels", tuple(float(v) for v in sent))
        if self.flag_policy not in FLAG_POLICIES:
            raise ConfigError(
                f"data.flag_policy = {self.flag_policy!r}; allowed values: {', '.join(FLAG_POLICIES)}"
            )
        v = self.max_abs_rv_kms
        if isinstance(v, bool) or not isinstance(v, int | float) or not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"data.max_abs_rv_kms = {v!r}; must be a finite number > 0")
        object.__setattr__(self, "max_abs_rv_kms", float(v))

    @classmethod
    def from_config(cls, data: Mapping[str, Any], flag_policy: str | None = None) -> CatalogRules:
        """Rules from the ``[data]`` section of a resolved configuration (missing keys: defaults).

        Parameters
        ----------
        data : mapping
            The ``[data]`` section.
        flag_policy : str, optional
            Overrides ``data.flag_policy`` (the ``--flag-policy`` option).
        """
        kw: dict[str, Any] = {}
        for key in ("label_ranges", "sentinels", "flag_policy", "max_abs_rv_kms"):
            if data.get(key) is not None:
                kw[key] = data[key]
        if flag_policy is not None:
            kw["flag_policy"] = flag_policy
        return cls(**kw)

    def range_of(self, label: str) -> tuple[float, float] | None:
        """Plausible range of ``label`` (its own entry, else its wildcard), or None."""
        return label_range(label, dict(self.label_ranges))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for manifests)."""
        return {
            "label_ranges": {k: list(v) for k, v in self.label_ranges.items()},
            "sentinels": list(self.sentinels),
            "flag_policy": self.flag_policy,
            "max_abs_rv_kms": self.max_abs_rv_kms,
        }


# --------------------------------------------------------------------------------------------- catalog


@dataclass
class Catalog:
    """A parsed label catalogue.

    Attributes
    ----------
    path : Path
        The CSV file.
    table : DataFrame
        Columns ``spec``, ``teff``, ``logg``, ``fe_h`` (NaN when absent), each other label kept under its
        canonical name (``C_FE``, ``ALPHA_M``, ``VMIC``), and ``rv``, ``snr``, ``group`` when given. Values
        are cleaned (see :class:`CatalogRules`).
    elements : list of str
        The primary labels: the requested ones, or every abundance-like column found (``*_FE``, ``*_H``,
        ``*_M``), or, when there is none, the stellar parameters present.
    errors : DataFrame
        Uncertainty of each label that has an error column (canonical label names as columns, rows as in
        ``table``); NaN where unknown or where the label is masked.
    masked : dict
        ``{name: {reason: count}}`` over the catalogue rows for every label kept (``MG_FE``), its error
        (``MG_FE_err``), ``rv`` and ``snr``; reasons are :data:`MASK_REASONS` (plus ``flag_kept`` for
        flagged values kept under the 'keep' policy).
    columns : dict
        ``{label: {"value": column, "error": column, "flag": column}}``: the source columns used.
    """

    path: Path
    table: pd.DataFrame
    elements: list[str]
    errors: pd.DataFrame = field(default_factory=pd.DataFrame)
    masked: dict[str, dict[str, int]] = field(default_factory=dict)
    columns: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        """Primary labels followed by the stellar parameters present in the file (not already listed)."""
        params = [
            p
            for p, col in _PARAM_ALIASES.items()
            if p not in self.elements and col in self.table and self.table[col].notna().any()
        ]
        return [*self.elements, *params]

    def labels(self, names: Sequence[str]) -> np.ndarray:
        """(N, len(names)) float array of the named labels (NaN when missing, also for absent columns)."""
        y = np.full((len(self.table), len(names)), np.nan)
        for j, name in enumerate(names):
            col = _PARAM_ALIASES.get(name, name)
            if col in self.table:
                y[:, j] = self.table[col].to_numpy(dtype=float)
        return y

    def label_errors(self, names: Sequence[str]) -> np.ndarray:
        """(N, len(names)) float array of the labels' uncertainties (NaN when unknown)."""
        e = np.full((len(self.table), len(names)), np.nan)
        for j, name in enumerate(names):
            if name in self.errors:
                e[:, j] = self.errors[name].to_numpy(dtype=float)
        return e

    def masked_total(self) -> int:
        """Number of values masked by any reason (flagged values kept are not counted)."""
        return sum(v for d in self.masked.values() for k, v in d.items() if k in MASK_REASONS)


def _canon(name: str) -> str:
    s = str(name).strip().upper()
    s = s.replace("[", "").replace("]", "").replace("/", "_").replace("-", "_").replace(" ", "")
    return re.sub(r"_+", "_", s)


def _strip_affix(canon: str, prefixes: Sequence[str], suffixes: Sequence[str]) -> str | None:
    for p in prefixes:
        if canon.startswith(p) and len(canon) > len(p):
            return canon[len(p) :]
    for s in suffixes:
        if canon.endswith(s) and len(canon) > len(s):
            return canon[: -len(s)]
    return None


def _is_missing_text(series: pd.Series) -> np.ndarray:
    """True where a raw value is missing: NaN/None or a blank string."""
    miss = series.isna().to_numpy()
    if series.dtype == object:
        blank = series.astype(str).str.strip() == ""
        miss = miss | blank.to_numpy()
    return miss


def _clean_numeric(
    series: pd.Series, sentinels: Sequence[float], lo: float, hi: float
) -> tuple[np.ndarray, dict[str, int]]:
    """Numbers of a raw column with non-numeric entries, sentinels and values outside [lo, hi] as NaN."""
    num = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    missing = _is_missing_text(series)
    non_numeric = ~missing & np.isnan(num)
    sentinel = np.zeros(len(num), dtype=bool)
    for s in sentinels:
        sentinel |= np.abs(num - s) <= 1e-6 * max(abs(s), 1.0)
    with np.errstate(invalid="ignore"):
        implausible = ~sentinel & ~np.isnan(num) & (~np.isfinite(num) | (num < lo) | (num > hi))
    out = np.where(sentinel | implausible, np.nan, num)
    counts = {
        "non_numeric": int(non_numeric.sum()),
        "sentinel": int(sentinel.sum()),
        "implausible": int(implausible.sum()),
    }
    return out, counts


def _flag_set(series: pd.Series, how: str = "nonzero") -> np.ndarray:
    """True where a flag column marks a row as bad.

    ``how='nonzero'``: any non-zero number, ``true``, or other non-empty text; ``'star_bad'``: APOGEE's
    ASPCAPFLAG bit 23 (STAR_BAD) when numeric, the word STAR_BAD when text.
    """
    if series.dtype == bool:
        return series.to_numpy(dtype=bool)
    num = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    text = series.astype(str).str.strip()
    is_text = np.isnan(num) & ~_is_missing_text(series)
    if how == "star_bad":
        bits = np.zeros(len(num), dtype=bool)
        fin = np.isfinite(num)
        bits[fin] = (num[fin].astype(np.int64) >> _APOGEE_STAR_BAD_BIT) & 1 == 1
        return bits | (is_text & text.str.upper().str.contains("STAR_BAD").to_numpy())
    with np.errstate(invalid="ignore"):
        nonzero = np.isfinite(num) & (num != 0)
    return nonzero | (is_text & ~text.str.lower().isin(_FALSE_TEXT).to_numpy())


def _check_some_usable(
    path: Path,
    col: str,
    what: str,
    values: np.ndarray,
    counts: dict[str, int],
    limits: tuple[float, float],
    raw: pd.Series,
) -> None:
    """Refuse a column whose values are all sentinels or out of range: wrong units or convention, not data.

    Single bad values are masked; a column without one usable value among numbers given (for example
    an ``rv`` in m/s, a Teff in log10 or a label written as -9999 throughout) would silently lose the whole
    label, so it is an error naming the column.
    """
    bad = counts["sentinel"] + counts["implausible"]
    if bad == 0 or np.isfinite(values).any():
        return
    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    example = num[~np.isnan(num)][0]
    raise CatalogError(
        f"{path}: column {col!r} ({what}) has no usable value: {counts['sentinel']} sentinel(s), "
        f"{counts['implausible']} outside the plausible range [{limits[0]:g}, {limits[1]:g}] "
        f"(e.g. {example:g}); check its units, drop or rename the column, or change data.label_ranges / "
        "data.max_abs_rv_kms / data.sentinels"
    )


def _find_column(raw_name: str, columns: Sequence[str]) -> str | None:
    """The column a user-named label refers to: exact, case-insensitive, or the same canonical name."""
    name = str(raw_name).strip()
    for match in (
        lambda c: c == name,
        lambda c: c.lower() == name.lower(),
        lambda c: _canon(c) == _canon(name),
        lambda c: normalize_label(c) == normalize_label(name),
    ):
        hits = [c for c in columns if match(c)]
        if hits:
            return hits[0]
    return None


def read_catalog(
    path: str | Path,
    elements: Sequence[str] | None = None,
    *,
    require_labels: bool = True,
    rules: CatalogRules | None = None,
) -> Catalog:
    """Read, recognise and clean a label CSV (see the module docstring for the column rules).

    Parameters
    ----------
    path : path
        The CSV file.
    elements : list of str, optional
        Labels to keep (any spelling; any numeric column may be named). Default: every abundance-like
        column (``*_FE``, ``*_H``, ``*_M``), or the stellar parameters when there is none.
    require_labels : bool
        True for a reference catalogue: at least one label must be present, and every requested one.
        A prediction catalogue (False) may hold only ``spec``; requested labels it lacks are skipped.
    rules : CatalogRules, optional
        Sentinels, plausible ranges, flag policy and RV limit (default: the defaults).

    Raises
    ------
    CatalogError
        File missing or unreadable, no ``spec`` column, no label (reference), or a requested column that
        holds no numbers.
    ConfigError
        A requested label that is not in the file (the message lists the available ones).
    """
    rules = rules or CatalogRules()
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: label catalogue not found")
    try:
        raw = pd.read_csv(path, dtype={"spec": str, "SPEC": str, "Spec": str}, comment=None)
    except Exception as exc:
        raise CatalogError(f"{path}: cannot read as CSV ({exc})") from exc
    raw = raw.rename(columns={c: str(c).strip() for c in raw.columns})
    spec_cols = [c for c in raw.columns if c.lower() == "spec"]
    if not spec_cols:
        raise CatalogError(
            f"{path}: no 'spec' column (found: {', '.join(map(str, raw.columns))}); "
            "the 'spec' column names each spectrum's FITS file or obsid"
        )
    spec = raw[spec_cols[0]].astype(object).where(raw[spec_cols[0]].notna(), "").astype(str).str.strip()
    empty = spec.isin(["", "nan", "None"]).to_numpy()
    if empty.any():
        log.warning("%s: %d rows with an empty spec value dropped", path, int(empty.sum()))
    raw = raw.loc[~empty].reset_index(drop=True)
    out = pd.DataFrame({"spec": spec[~empty].reset_index(drop=True)})
    other = [c for c in raw.columns if c != spec_cols[0]]

    # roles of the columns
    found: dict[str, str] = {}
    err_cols: dict[str, str] = {}
    flag_cols: dict[str, str] = {}
    star_flags: dict[str, str] = {}
    for c in other:
        canon = _canon(c)
        lab = normalize_label(c)
        if canon in _STAR_FLAGS:
            star_flags.setdefault(c, _STAR_FLAGS[canon])
        elif label_kind(lab) is not None:
            if lab in found:
                raise CatalogError(
                    f"{path}: columns {found[lab]!r} and {c!r} are both the label {lab}; "
                    "keep one of them (or rename the other)"
                )
            found[lab] = c
        elif (base := _strip_affix(canon, _ERR_PREFIXES, _ERR_SUFFIXES)) is not None:
            err_cols.setdefault(normalize_label(base), c)
        elif (base := _strip_affix(canon, _FLAG_PREFIXES, _FLAG_SUFFIXES)) is not None:
            flag_cols.setdefault(normalize_label(base), c)

    # which labels
    recognised = list(found)
    user_named: set[str] = set()
    if elements:
        keep: list[str] = []
        for name in split_values(elements):
            lab = normalize_label(name)
            if lab not in found:
                col = _find_column(name, other)
                if col is None:
                    if not require_labels:
                        log.info("%s: no column for label %s (left NaN)", path, lab)
                        continue
                    raise ConfigError(
                        f"{name!r} ({lab}): not a column of catalogue {path.name}; valid choices: "
                        f"{', '.join(recognised) or '(none)'}, or any numeric column "
                        f"(columns: {', '.join(map(str, other))})"
                    )
                found[lab] = col
                user_named.add(lab)
            if lab not in keep:
                keep.append(lab)
    else:
        keep = [lab for lab in found if label_kind(lab) == "abundance"]
        keep = keep or [p for p in STELLAR_PARAMETERS if p in found]
    if require_labels and not keep:
        raise CatalogError(
            f"{path}: a reference catalogue needs at least one label column (e.g. MG_FE, TEFF, LOGG, FE_H, "
            f"ALPHA_M, or any numeric column named with --elements); found columns: "
            f"{', '.join(map(str, raw.columns))}"
        )

    # values
    parsed = [p for p in STELLAR_PARAMETERS if p in found] + [k for k in keep if k not in STELLAR_PARAMETERS]
    row_bad = np.zeros(len(raw), dtype=bool)
    for c, how in star_flags.items():
        row_bad |= _flag_set(raw[c], how)
    masked: dict[str, dict[str, int]] = {}
    columns: dict[str, dict[str, str]] = {}
    errors = pd.DataFrame(index=out.index)
    for lab in parsed:
        col = found[lab]
        lo, hi = rules.range_of(lab) or (-math.inf, math.inf)
        values, counts = _clean_numeric(raw[col], rules.sentinels, lo, hi)
        if require_labels:
            _check_some_usable(path, col, f"label {lab}", values, counts, (lo, hi), raw[col])
        n_given = int((~_is_missing_text(raw[col])).sum())
        if lab in user_named and counts["non_numeric"] and counts["non_numeric"] == n_given:
            raise CatalogError(
                f"{path}: column {col!r} (label {lab}) holds no numbers (e.g. {raw[col].dropna().iloc[0]!r})"
            )
        columns[lab] = {"value": col}
        flagged = row_bad.copy()
        if lab in flag_cols:
            flagged |= _flag_set(raw[flag_cols[lab]])
            columns[lab]["flag"] = flag_cols[lab]
        flagged &= np.isfinite(values)
        if rules.flag_policy == "mask":
            values = np.where(flagged, np.nan, values)
            counts["flag"] = int(flagged.sum())
        else:
            counts["flag"] = 0
            counts["flag_kept"] = int(flagged.sum())
        masked[lab] = counts
        out[_PARAM_ALIASES.get(lab, lab)] = values
        if lab in err_cols:
            ecol = err_cols[lab]
            evals, ecounts = _clean_numeric(raw[ecol], rules.sentinels, 0.0, math.inf)
            errors[lab] = np.where(np.isnan(values), np.nan, evals)
            masked[f"{lab}_err"] = {**ecounts, "flag": 0}
            columns[lab]["error"] = ecol
    for col in _PARAM_ALIASES.values():
        if col not in out:
            out[col] = np.nan
    first = ["spec", *_PARAM_ALIASES.values()]
    out = out[first + [c for c in out.columns if c not in first]]

    lower = {c.lower(): c for c in other}
    if "rv" in lower:
        lim = rules.max_abs_rv_kms
        out["rv"], counts = _clean_numeric(raw[lower["rv"]], rules.sentinels, -lim, lim)
        if counts["implausible"]:
            _check_some_usable(
                path, lower["rv"], "rv (km/s)", out["rv"], counts, (-lim, lim), raw[lower["rv"]]
            )
        masked["rv"] = {**counts, "flag": 0}
    if "snr" in lower:
        out["snr"], counts = _clean_numeric(raw[lower["snr"]], rules.sentinels, 0.0, math.inf)
        masked["snr"] = {**counts, "flag": 0}
    if "group" in lower:
        out["group"] = raw[lower["group"]].astype(str)

    cat = Catalog(path=path, table=out, elements=keep, errors=errors, masked=masked, columns=columns)
    if cat.masked_total():
        parts = [
            f"{name} " + ", ".join(f"{n} {r}" for r, n in c.items() if n and r in MASK_REASONS)
            for name, c in masked.items()
            if any(n for r, n in c.items() if r in MASK_REASONS)
        ]
        log.warning("%s: values masked (NaN): %s", path, "; ".join(parts))
    return cat


# --------------------------------------------------------------------------------------------- matching


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


def _safe_resolve(path: Path) -> Path | None:
    """``path.resolve()``, or None when it cannot be resolved (symlink loop, permission, I/O error)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def _relative_key(path: Path, root: Path, lexical_root: Path) -> str | None:
    """Suffix-free path of ``path`` relative to the FITS folder; None when it lies outside.

    Resolved when possible (symlinks inside the folder followed); an unresolvable path (a symlink loop)
    is taken lexically, so a row naming it still matches and the file is reported as unreadable.
    """
    resolved = _safe_resolve(path)
    try:
        if resolved is not None:
            rel = resolved.relative_to(root).as_posix()
        else:
            rel = Path(os.path.relpath(os.path.abspath(path), lexical_root)).as_posix()
            if rel.startswith("../") or rel == "..":
                return None
    except ValueError:
        return None
    return _FITS_SUFFIX.sub("", rel)


def unreadable_reason(path: Path) -> str | None:
    """Why a listed file cannot be opened (``os.stat`` fails: symlink loop, dangling link, ...), or None."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def match_catalog(catalog: Catalog, fits_files: list[Path], fits_dir: str | Path) -> MatchResult:
    """Match catalogue rows to FITS files.

    A ``spec`` value containing a path separator is taken relative to ``fits_dir`` and must stay inside it;
    otherwise it matches a file by base name without suffixes, so ``spec-1.fits``, ``spec-1.fits.gz``
    and ``spec-1`` are the same key, and an obsid matches a file named ``<obsid>.fits``. Files whose path
    cannot be resolved (a symlink loop) still match by name; reading them fails later with a reason.
    """
    fits_dir = Path(fits_dir)
    by_key: dict[str, Path] = {}
    by_rel: dict[str, Path] = {}
    root = _safe_resolve(fits_dir) or Path(os.path.abspath(fits_dir))
    lexical_root = Path(os.path.abspath(fits_dir))
    for f in fits_files:
        by_key.setdefault(spec_key(f.name), f)
        rel = _relative_key(f, root, lexical_root)
        if rel is not None:
            by_rel[rel] = f
    res = MatchResult()
    used: set[Path] = set()
    rows: list[int] = []
    for i, spec in enumerate(catalog.table["spec"].tolist()):
        s = spec.replace("\\", "/")
        target: Path | None
        if "/" in s:
            candidate = Path(s) if Path(s).is_absolute() else fits_dir / s
            rel = None if ".." in Path(s).parts else _relative_key(candidate, root, lexical_root)
            if rel is None:
                res.unmatched_rows.append((spec, "path escapes the FITS directory"))
                continue
            target = by_rel.get(rel)
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
