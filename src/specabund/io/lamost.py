"""Reader for LAMOST low-resolution (LRS) spectra in FITS format.

Three on-disk layouts are supported, each by a small format reader with a cheap ``identify`` test and a
``read`` function (the same structure as specutils' format registry):

``dr9_table``
    DR9 and later: the primary HDU holds only a header (with stale ``NAXIS1``/``NAXIS2`` cards that must be
    ignored) and HDU 1 ``COADD`` is a one-row binary table with ``FLUX``, ``IVAR``, ``WAVELENGTH``,
    ``ANDMASK`` and ``ORMASK`` array columns.
``image_5xN``
    DR2 to DR8: a 5 x N image whose rows are flux, inverse variance, wavelength, andmask and ormask.
``dr1_subcontinuum``
    DR1: a 5 x N image whose row 2 is the *subcontinuum*, not the wavelength (``EXTEN0`` says so); the
    wavelength comes from the log-linear solution ``log10(lambda_i) = COEFF0 + i * COEFF1``.

Medium-resolution (MRS) files, which carry ``COADD_B``/``COADD_R`` tables, are recognised and refused with a
clear message. Every failure is reported as :class:`specabund.errors.FitsFormatError`.

Speed: the file is read into memory once (``.gz``/``.bz2`` are decompressed by the standard library), headers
are parsed by astropy with ``lazy_load_hdus=True`` so only the HDUs needed are touched, and the data block
of the chosen HDU is decoded straight from the bytes with :func:`numpy.frombuffer` (astropy's ``FITS_rec``
column machinery costs more than the rest of the read for the one-row ``COADD`` table). Whenever the fast
path meets something it does not handle (scaled columns, odd formats, a header astropy parsed leniently) it
falls back to astropy's own data access.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import logging
import math
import os
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from specabund.errors import FitsFormatError
from specabund.io.rawfits import BITPIX_DTYPES as _BITPIX_DTYPES
from specabund.io.rawfits import BLOCK as _BLOCK
from specabund.io.rawfits import NeedAstropy, RawHDU, RawHDUList, data_nbytes, find_end
from specabund.spectrum import Spectrum

logger = logging.getLogger(__name__)

__all__ = [
    "FITS_SUFFIXES",
    "LAYOUTS",
    "FormatReader",
    "iter_fits_files",
    "read_lamost",
]

#: File-name endings (case-insensitive) that :func:`iter_fits_files` collects.
FITS_SUFFIXES: tuple[str, ...] = (".fits", ".fits.gz", ".fit", ".fit.gz", ".fits.bz2")

#: Layout names a :class:`~specabund.spectrum.Spectrum` read here can carry in ``meta["layout"]``.
LAYOUTS: tuple[str, ...] = ("dr9_table", "image_5xN", "dr1_subcontinuum")

_MRS_MESSAGE = "medium-resolution (MRS) spectrum; specabund reads LAMOST low-resolution spectra only"
_TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK")
# Plausible wavelength range (Angstrom) of an optical spectrum, used to recognise a wavelength row.
_WAVE_MIN, _WAVE_MAX = 1000.0, 30000.0
# Header values at or below this are LAMOST's "missing" sentinels (-9999, -999).
_SENTINEL = -999.0
_TFORM_DTYPES = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
_TFORM_RE = re.compile(r"^\s*(\d*)\s*([A-Z])\s*$")
_RELEASE_RE = re.compile(r"\bDR\s*(\d+)\b", re.IGNORECASE)
_TRUNCATION_RE = re.compile(r"truncat|smaller than the expected size|unexpected end", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FormatReader:
    """One on-disk layout: a cheap test and a reader.

    Attributes
    ----------
    name : str
        Layout name stored in ``meta["layout"]`` (or a descriptive name for refusing readers).
    identify : callable
        ``identify(hdul) -> bool``; looks at headers (and, only when the headers are silent, at the data).
    read : callable
        ``read(hdul, path, raw=None) -> Spectrum``. ``raw`` is the file's (decompressed) bytes; when given,
        the data block is decoded directly from it, otherwise astropy's data access is used.
    """

    name: str
    identify: Callable[[fits.HDUList], bool]
    read: Callable[..., Spectrum]


# ------------------------------------------------------------------------------------------ public API


def read_lamost(path: str | Path) -> Spectrum:
    """Read one LAMOST low-resolution spectrum.

    Parameters
    ----------
    path : str or Path
        A ``.fits``, ``.fit``, ``.fits.gz`` or ``.fits.bz2`` file (compression is recognised from the
        content, not the name).

    Returns
    -------
    Spectrum
        ``wavelength`` (float64, vacuum Angstrom, strictly increasing), ``flux`` and ``ivar`` (float64;
        ``ivar`` is 0 wherever the flux or ivar was not finite or ivar was negative, and such non-finite flux
        is set to 0), ``andmask`` and ``ormask`` (int32) and ``meta`` with ``obsid``, ``filename``,
        ``designation``, ``ra``, ``dec``, ``class``, ``subclass``, ``z``, ``z_err``, ``snr_u`` .. ``snr_z``,
        ``data_release``, ``layout`` and ``path``. Header values that are absent, unparsable or LAMOST's
        missing-value sentinels (-9999, -999) are ``None``; SNRs come from ``SNRU``..``SNRZ`` or, in DR1/DR2
        headers, ``SN_U``..``SN_Z``.

    Raises
    ------
    FitsFormatError
        The file is missing, empty, not FITS, truncated, a medium-resolution spectrum, holds no recognisable
        LAMOST low-resolution spectrum, or its arrays are inconsistent (lengths differ, wavelength not
        increasing).
    """
    path = Path(path)
    raw = _load_bytes(path)
    # the common, plain file: headers parsed straight from the bytes (about 5x faster than astropy); any
    # doubt, and any failure, and the file is read again by astropy, whose messages and fixes then apply
    try:
        return _dispatch(RawHDUList(raw), path, raw)
    except (NeedAstropy, FitsFormatError, OSError, ValueError, TypeError, IndexError, KeyError, EOFError):
        pass
    return _read_astropy(path, raw)


def _read_astropy(path: Path, raw: bytes) -> Spectrum:
    """:func:`read_lamost` of the file's bytes through astropy (the reference path)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=True)
        except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError) as exc:
            raise FitsFormatError(
                path, _failure_reason(raw, caught, f"cannot be parsed as FITS ({exc})")
            ) from exc
        try:
            spectrum = _dispatch(hdul, path, raw)
        except FitsFormatError:
            raise
        except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError) as exc:
            reason = _failure_reason(raw, caught, f"cannot be read ({type(exc).__name__}: {exc})")
            raise FitsFormatError(path, reason) from exc
        finally:
            hdul.close()
    for w in caught:
        message = str(w.message)
        if _TRUNCATION_RE.search(message):
            raise FitsFormatError(path, f"file is truncated ({message})")
        logger.debug("%s: astropy warning while reading: %s", path, message)
    return spectrum


def iter_fits_files(folder: str | Path, pattern: str | None = None) -> list[Path]:
    """List the FITS files under a folder, recursively, in sorted order.

    Parameters
    ----------
    folder : str or Path
        Folder to search. Hidden files and hidden sub-folders (name starting with ``.``) are skipped,
        which also skips temporary files left by atomic writes.
    pattern : str, optional
        Shell-style pattern (:func:`fnmatch.fnmatch`, case-sensitive) the file *name* must also match,
        e.g. ``"spec-5585*"``.

    Returns
    -------
    list of Path
        Files whose name ends (case-insensitively) in one of :data:`FITS_SUFFIXES`.

    Raises
    ------
    NotADirectoryError
        ``folder`` does not exist or is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a directory")
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if not name.lower().endswith(FITS_SUFFIXES):
                continue
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            found.append(Path(root) / name)
    return sorted(found)


# ------------------------------------------------------------------------------------------- file bytes


def _load_bytes(path: Path) -> bytes:
    """Read the whole file, decompress gzip/bzip2 by magic number, and check it starts like FITS."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise FitsFormatError(path, "no such file") from exc
    except IsADirectoryError as exc:
        raise FitsFormatError(path, "is a directory, not a FITS file") from exc
    except OSError as exc:
        raise FitsFormatError(path, f"cannot be read ({exc})") from exc
    if not raw:
        raise FitsFormatError(path, "file is empty")
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
    except EOFError as exc:
        raise FitsFormatError(path, "compressed file is truncated") from exc
    except (OSError, zlib.error, ValueError) as exc:
        raise FitsFormatError(path, f"compressed file is corrupt ({exc})") from exc
    if not raw.startswith(b"SIMPLE  ="):
        if not raw:
            raise FitsFormatError(path, "file is empty after decompression")
        raise FitsFormatError(path, "not a FITS file (it does not start with a SIMPLE card)")
    if len(raw) < _BLOCK:
        raise FitsFormatError(
            path, f"file is truncated ({len(raw)} bytes, less than one 2880-byte FITS block)"
        )
    return raw


def _failure_reason(raw: bytes, caught: list[warnings.WarningMessage], default: str) -> str:
    """Explain a failure, preferring truncation when the evidence points to it."""
    for w in caught:
        if _TRUNCATION_RE.search(str(w.message)):
            return f"file is truncated ({w.message})"
    if len(raw) % _BLOCK:
        return f"file is truncated or corrupt (size {len(raw)} is not a multiple of 2880 bytes): {default}"
    return default


def _dispatch(hdul: fits.HDUList, path: Path, raw: bytes | None) -> Spectrum:
    for reader in _READERS:
        if reader.identify(hdul):
            return reader.read(hdul, path, raw)
    if raw is not None and len(raw) % _BLOCK:
        raise FitsFormatError(
            path, f"file is truncated (size {len(raw)} is not a multiple of 2880 bytes) or holds no spectrum"
        )
    raise FitsFormatError(path, "no recognisable LAMOST low-resolution spectrum in this FITS file")


# --------------------------------------------------------------------------------------- HDU helpers


def _hdu(hdul: fits.HDUList, index: int) -> Any | None:
    """HDU ``index`` or None when the file has fewer HDUs (lazy loading reads headers up to it)."""
    try:
        return hdul[index]
    except IndexError:
        return None


def _is_bintable(hdu: Any) -> bool:
    return isinstance(hdu, fits.BinTableHDU) or getattr(hdu, "kind", None) == "bintable"


def _is_image_extension(hdu: Any) -> bool:
    return isinstance(hdu, fits.ImageHDU) or getattr(hdu, "kind", None) == "image"


def _has_data(hdu: Any) -> bool:
    """Whether an HDU's own header declares a non-empty data array (``NAXIS`` > 0, all axes > 0)."""
    shape = getattr(hdu, "shape", None)
    if shape is None:
        return False
    return len(shape) > 0 and all(n > 0 for n in shape)


def _data_offset(raw: bytes, hdul: fits.HDUList, index: int) -> tuple[int, int] | None:
    """Byte offset and length of HDU ``index``'s data in ``raw``, found by scanning for END cards.

    Returns None when the scan disagrees with astropy's parse (a non-standard header), in which case the
    caller uses astropy's data access instead. A :class:`RawHDU` knows its span from its own parse.
    """
    hdu = hdul[index]
    if isinstance(hdu, RawHDU):
        return hdu.data_start, hdu.nbytes
    offset = 0
    for i in range(index + 1):
        header = hdul[i].header
        end = find_end(raw, offset)
        if end is None:
            return None
        data_start = end + (-end % _BLOCK)
        nbytes = data_nbytes(header)
        if nbytes is None:
            return None
        if i == index:
            return data_start, nbytes
        offset = data_start + nbytes + (-nbytes % _BLOCK)
    return None


def _check_span(path: Path, raw: bytes, start: int, nbytes: int) -> None:
    if start + nbytes > len(raw):
        raise FitsFormatError(
            path, f"file is truncated: data needs {start + nbytes} bytes, the file has {len(raw)}"
        )


# ----------------------------------------------------------------------------------------- header meta


class _Cards:
    """Header look-up in the primary header first, then in the data HDU's header."""

    def __init__(self, *headers: fits.Header) -> None:
        self._headers = [h for h in headers if h is not None]

    def get(self, key: str) -> Any:
        for header in self._headers:
            if key in header:
                value = header[key]
                if value is not None and not isinstance(value, fits.card.Undefined):
                    return value
        return None


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number <= _SENTINEL:
        return None
    return number


def _as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    number = _as_float(value)
    if number is None or number != int(number):
        return None
    return int(number)


def _as_str(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _data_release(value: Any) -> str | None:
    text = _as_str(value)
    if text is None:
        return None
    match = _RELEASE_RE.search(text)
    return f"DR{int(match.group(1))}" if match else None


def _meta(cards: _Cards, path: Path, layout: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "obsid": _as_int(cards.get("OBSID")),
        "filename": _as_str(cards.get("FILENAME")) or path.name,
        "designation": _as_str(cards.get("DESIG")),
        "ra": _as_float(cards.get("RA")),
        "dec": _as_float(cards.get("DEC")),
        "class": _as_str(cards.get("CLASS")),
        "subclass": _as_str(cards.get("SUBCLASS")),
        "z": _as_float(cards.get("Z")),
        "z_err": _as_float(cards.get("Z_ERR")),
    }
    for band in "ugriz":
        # DR2+ headers use SNRG; DR1 (and some DR2) headers use SN_G.
        value = cards.get(f"SNR{band.upper()}")
        if value is None:
            value = cards.get(f"SN_{band.upper()}")
        meta[f"snr_{band}"] = _as_float(value)
    meta["data_release"] = _data_release(cards.get("DATA_V"))
    meta["layout"] = layout
    meta["path"] = str(path)
    return meta


# ------------------------------------------------------------------------------------ array finishing


def _finish(
    path: Path,
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    andmask: np.ndarray,
    ormask: np.ndarray,
    meta: dict[str, Any],
) -> Spectrum:
    """Validate and convert the five arrays; mask non-finite pixels."""
    arrays = {"wavelength": wavelength, "flux": flux, "ivar": ivar, "andmask": andmask, "ormask": ormask}
    for name, arr in arrays.items():
        if arr.ndim != 1:
            raise FitsFormatError(path, f"{name} array has shape {arr.shape}, expected one dimension")
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise FitsFormatError(path, f"arrays of inconsistent length ({detail})")
    n = lengths["wavelength"]
    if n < 2:
        raise FitsFormatError(path, f"spectrum has {n} pixel(s)")
    wave = np.asarray(wavelength, dtype=np.float64)
    if not np.all(np.isfinite(wave)):
        raise FitsFormatError(path, "wavelength array has non-finite values")
    if not np.all(np.diff(wave) > 0):
        raise FitsFormatError(path, "wavelength array is not increasing")
    if wave[0] < _WAVE_MIN or wave[-1] > _WAVE_MAX:
        raise FitsFormatError(
            path, f"wavelength range {wave[0]:.1f}-{wave[-1]:.1f} is not an optical spectrum in Angstrom"
        )
    flux64 = np.array(flux, dtype=np.float64)
    ivar64 = np.array(ivar, dtype=np.float64)
    bad_flux = ~np.isfinite(flux64)
    bad = bad_flux | ~np.isfinite(ivar64) | (ivar64 < 0)
    if bad.any():
        flux64[bad_flux] = 0.0
        ivar64[bad] = 0.0
    return Spectrum(
        wavelength=wave,
        flux=flux64,
        ivar=ivar64,
        andmask=_mask_int32(andmask),
        ormask=_mask_int32(ormask),
        meta=meta,
    )


def _mask_int32(mask: np.ndarray) -> np.ndarray:
    if mask.dtype.kind == "f":
        mask = np.nan_to_num(mask, nan=0.0, posinf=0.0, neginf=0.0)
        mask = np.clip(mask, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    return np.asarray(mask).astype(np.int32)


# ------------------------------------------------------------------------------------------- MRS refusal


def _identify_mrs(hdul: fits.HDUList) -> bool:
    if _has_data(hdul[0]):
        return False
    for index in (1, 2):
        hdu = _hdu(hdul, index)
        if hdu is not None and hdu.name.upper() in {"COADD_B", "COADD_R"}:
            return True
    return False


def _read_mrs(hdul: fits.HDUList, path: Path, raw: bytes | None = None) -> Spectrum:
    raise FitsFormatError(path, _MRS_MESSAGE)


# ------------------------------------------------------------------------------------ DR9+ COADD table


def _table_index(hdul: fits.HDUList) -> int | None:
    """Index of the COADD table: HDU 1 when it fits, else the first later HDU that does."""
    if _has_data(hdul[0]):
        return None
    index = 1
    while True:
        hdu = _hdu(hdul, index)
        if hdu is None:
            return None
        if _is_bintable(hdu):
            if hdu.name.upper() == "COADD":
                return index
            if {"FLUX", "IVAR", "WAVELENGTH"} <= set(_table_column_names(hdu.header)):
                return index
        index += 1


def _table_column_names(header: fits.Header) -> list[str]:
    nfields = header.get("TFIELDS", 0)
    if not isinstance(nfields, int):
        return []
    return [str(header.get(f"TTYPE{i}", "")).strip().upper() for i in range(1, nfields + 1)]


def _identify_table(hdul: fits.HDUList) -> bool:
    return _table_index(hdul) is not None


def _table_dtype(header: fits.Header, names: list[str]) -> np.dtype | None:
    """Record dtype of a binary table of plain numeric array columns, or None to use astropy."""
    if not names or len(set(names)) != len(names) or any(not name for name in names):
        return None
    fields = []
    for i, name in enumerate(names, start=1):
        if f"TSCAL{i}" in header or f"TZERO{i}" in header:
            return None
        match = _TFORM_RE.match(str(header.get(f"TFORM{i}", "")).upper())
        if match is None or match.group(2) not in _TFORM_DTYPES:
            return None
        repeat = int(match.group(1)) if match.group(1) else 1
        fields.append((name, _TFORM_DTYPES[match.group(2)], (repeat,)))
    dtype = np.dtype(fields)
    if dtype.itemsize != header.get("NAXIS1"):
        return None
    return dtype


def _read_table(hdul: fits.HDUList, path: Path, raw: bytes | None = None) -> Spectrum:
    index = _table_index(hdul)
    if index is None:
        raise FitsFormatError(path, "no COADD binary table")
    hdu = hdul[index]
    header = hdu.header
    names = _table_column_names(header)
    missing = [c for c in _TABLE_COLUMNS if c not in names]
    if missing:
        raise FitsFormatError(path, f"COADD table lacks column(s) {', '.join(missing)}")
    nrows = header.get("NAXIS2")
    if nrows != 1:
        raise FitsFormatError(path, f"COADD table has {nrows} rows, expected 1")
    columns: dict[str, np.ndarray] | None = None
    dtype = _table_dtype(header, names) if raw is not None else None
    span = _data_offset(raw, hdul, index) if (raw is not None and dtype is not None) else None
    if raw is not None and dtype is not None and span is not None:
        start, nbytes = span
        _check_span(path, raw, start, nbytes)
        record = np.frombuffer(raw, dtype=dtype, count=1, offset=start)[0]
        columns = {c: np.asarray(record[c]).ravel() for c in _TABLE_COLUMNS}
    else:
        data = hdu.data
        columns = {c: np.asarray(data[c][0]).ravel() for c in _TABLE_COLUMNS}
    cards = _Cards(hdul[0].header, header)
    return _finish(
        path,
        columns["WAVELENGTH"],
        columns["FLUX"],
        columns["IVAR"],
        columns["ANDMASK"],
        columns["ORMASK"],
        _meta(cards, path, "dr9_table"),
    )


# ------------------------------------------------------------------------------------ 5 x N images


def _image_index(hdul: fits.HDUList) -> int | None:
    """HDU 0 when it holds an image, else HDU 1 when that is a non-empty image extension."""
    if _has_data(hdul[0]):
        return 0
    hdu = _hdu(hdul, 1)
    if hdu is not None and _is_image_extension(hdu) and _has_data(hdu):
        return 1
    return None


def _row_names(cards: _Cards) -> list[str] | None:
    """Row names from ``EXTEN0`` ('Flux, Inverse, Wavelength, ...') or from one ``EXTENi`` card per row."""
    exten0 = _as_str(cards.get("EXTEN0"))
    if exten0 is None:
        return None
    tokens = [t for t in re.split(r"[,\s;/]+", exten0.lower()) if t]
    if len(tokens) >= 3:
        return tokens
    names = []
    for i in range(5):
        value = _as_str(cards.get(f"EXTEN{i}"))
        if value is None:
            break
        names.append(value.lower())
    return names if len(names) >= 3 else None


def _looks_like_wavelength(row: np.ndarray) -> bool:
    row = np.asarray(row, dtype=np.float64)
    return bool(
        row.size > 1
        and np.all(np.isfinite(row))
        and np.all(np.diff(row) > 0)
        and row[0] >= _WAVE_MIN
        and row[-1] <= _WAVE_MAX
    )


def _loglinear_solution(cards: _Cards) -> tuple[float, float] | None:
    """``(log10 lambda_0, dlog10 lambda)`` from COEFF0/COEFF1, else from CRVAL1/CD1_1 with DC-FLAG=1."""
    c0, c1 = _as_float(cards.get("COEFF0")), _as_float(cards.get("COEFF1"))
    if c0 is not None and c1 is not None:
        return c0, c1
    if _as_int(cards.get("DC-FLAG")) == 1:
        crval = _as_float(cards.get("CRVAL1"))
        delta = _as_float(cards.get("CD1_1"))
        if delta is None:
            delta = _as_float(cards.get("CDELT1"))
        crpix = _as_float(cards.get("CRPIX1"))
        if crval is not None and delta is not None:
            return crval + (1.0 - (crpix if crpix is not None else 1.0)) * delta, delta
    return None


def _classify_image(hdul: fits.HDUList) -> tuple[int, str] | None:
    """``(hdu index, 'wavelength' | 'subcontinuum')`` for a 5 x N LAMOST image, else None."""
    index = _image_index(hdul)
    if index is None:
        return None
    hdu = hdul[index]
    shape = hdu.shape
    if len(shape) != 2 or shape[0] != 5 or shape[1] < 2:
        return None
    cards = _Cards(hdul[0].header, hdu.header) if index else _Cards(hdu.header)
    names = _row_names(cards)
    if names is not None and len(names) >= 3:
        if "subcont" in names[2]:
            return index, "subcontinuum"
        if "wave" in names[2]:
            return index, "wavelength"
    # Headers are silent: look at the content of row 2. ``section`` reads just that row and, unlike
    # ``hdu.data``, leaves the header alone (loading scaled data rewrites BITPIX/BSCALE in memory).
    if _looks_like_wavelength(hdu.section[2]):
        return index, "wavelength"
    if _loglinear_solution(cards) is not None:
        return index, "subcontinuum"
    return None


def _identify_image(hdul: fits.HDUList) -> bool:
    found = _classify_image(hdul)
    return found is not None and found[1] == "wavelength"


def _identify_dr1(hdul: fits.HDUList) -> bool:
    found = _classify_image(hdul)
    return found is not None and found[1] == "subcontinuum"


def _image_data(hdul: fits.HDUList, index: int, path: Path, raw: bytes | None) -> np.ndarray:
    """The 5 x N image of HDU ``index``, decoded from ``raw`` when possible."""
    hdu = hdul[index]
    header = hdu.header
    scaled = header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or "BLANK" in header
    if raw is not None and not scaled:
        span = _data_offset(raw, hdul, index)
        if span is not None:
            start, nbytes = span
            _check_span(path, raw, start, nbytes)
            dtype = np.dtype(_BITPIX_DTYPES[header["BITPIX"]])
            count = nbytes // dtype.itemsize
            return np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(hdu.shape)
    return np.asarray(hdu.data)


def _read_image(hdul: fits.HDUList, path: Path, raw: bytes | None = None) -> Spectrum:
    found = _classify_image(hdul)
    if found is None or found[1] != "wavelength":
        raise FitsFormatError(path, "not a 5 x N flux/ivar/wavelength/andmask/ormask image")
    index = found[0]
    data = _image_data(hdul, index, path, raw)
    cards = _Cards(hdul[0].header, hdul[index].header) if index else _Cards(hdul[0].header)
    return _finish(path, data[2], data[0], data[1], data[3], data[4], _meta(cards, path, "image_5xN"))


def _read_dr1(hdul: fits.HDUList, path: Path, raw: bytes | None = None) -> Spectrum:
    found = _classify_image(hdul)
    if found is None or found[1] != "subcontinuum":
        raise FitsFormatError(path, "not a DR1 5 x N image with a subcontinuum row")
    index = found[0]
    cards = _Cards(hdul[0].header, hdul[index].header) if index else _Cards(hdul[0].header)
    solution = _loglinear_solution(cards)
    if solution is None:
        raise FitsFormatError(
            path, "DR1 layout (row 2 is the subcontinuum) without a COEFF0/COEFF1 wavelength solution"
        )
    data = _image_data(hdul, index, path, raw)
    c0, c1 = solution
    wavelength = 10.0 ** (c0 + np.arange(data.shape[1], dtype=np.float64) * c1)
    return _finish(
        path, wavelength, data[0], data[1], data[3], data[4], _meta(cards, path, "dr1_subcontinuum")
    )


# Order matters: refuse MRS first, then the table layout (header-only test), then the images.
_READERS: tuple[FormatReader, ...] = (
    FormatReader("mrs_refused", _identify_mrs, _read_mrs),
    FormatReader("dr9_table", _identify_table, _read_table),
    FormatReader("image_5xN", _identify_image, _read_image),
    FormatReader("dr1_subcontinuum", _identify_dr1, _read_dr1),
)
