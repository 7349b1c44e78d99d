"""A corpus of bad inputs for the command line: broken FITS files, catalogues, configurations, model
folders, datasets and destinations, built from the simulator (and, when present, the shared real files).

Every case says what a user must get (the *outcome*):

``rejected``
    the command succeeds (exit 0) and the input is listed in ``rejected.csv`` (preprocessing) or flagged
    in ``predictions.csv`` (``flag & 1``, prediction from raw files), with a reason matching ``match``;
``kept``
    the command succeeds and the input is used (a legitimate variant: ``.FITS``, stale NAXIS cards, ...);
``ok``
    the command succeeds (exit 0);
``flagged``
    the command succeeds and a ``WARNING`` line matching ``match`` names the problem (e.g. implausible
    catalogue values masked to NaN);
``error``
    exit 1 and one ``Error: ...`` line matching ``match``;
``usage``
    click refuses the option before the command runs (exit 2, ``Error: ...``).

``issue_item`` marks cases whose expected behaviour belongs to issue 16 items 2-4 (symlink loops,
empty/unmatched catalogues, implausible values), fixed elsewhere.

Usage: ``build_fits_cases(src, dest)`` writes the FITS cases; the other groups are lists of cases with a
``make(folder, base)`` function writing that case's input into ``folder``.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

REJECT = "rejected"
KEPT = "kept"
OK = "ok"
ERROR = "error"
USAGE = "usage"
FLAGGED = "flagged"


@dataclass
class Case:
    """One bad input and what the user must get."""

    id: str
    outcome: str | tuple[str, ...]
    match: str = ""
    make: Callable[..., Any] | None = None
    issue_item: int | None = None
    needs_shared: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def outcomes(self) -> tuple[str, ...]:
        return self.outcome if isinstance(self.outcome, tuple) else (self.outcome,)


# ------------------------------------------------------------------------------------------- FITS


def _load(path: Path) -> fits.HDUList:
    return fits.open(path, memmap=False)


def _write(hdul: fits.HDUList, dest: Path) -> None:
    hdul.writeto(dest, overwrite=True, output_verify="silentfix+ignore")


def _table_variant(src: Path, dest: Path, fn: Callable[[dict[str, np.ndarray], fits.Header], Any]) -> None:
    """Rewrite the COADD table of ``src`` after ``fn(columns, primary_header)`` edits the columns."""
    with _load(src) as h:
        cols = {c.name: np.array(h[1].data[c.name][0]) for c in h[1].columns}
        prim = h[0].header.copy()
    out = fn(cols, prim)
    if isinstance(out, fits.HDUList):
        _write(out, dest)
        return
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name=k, format=f"{len(v)}{_tform(v)}", array=v[None, :]) for k, v in cols.items()],
        name="COADD",
    )
    _write(fits.HDUList([fits.PrimaryHDU(header=prim), table]), dest)


def _tform(v: np.ndarray) -> str:
    return {"f": "E", "i": "J", "u": "J"}.get(v.dtype.kind, "E") if v.dtype.itemsize <= 4 else "D"


def _header_variant(src: Path, dest: Path, **cards: Any) -> None:
    with _load(src) as h:
        for k, v in cards.items():
            if v is None:
                h[0].header.remove(k, ignore_missing=True)
            else:
                h[0].header[k] = v
        _write(h, dest)


def _image_variant(src: Path, dest: Path, fn: Callable[[np.ndarray, fits.Header], Any]) -> None:
    with _load(src) as h:
        data = np.array(h[0].data, dtype=np.float32)
        header = h[0].header.copy()
    out = fn(data, header)
    data = out if isinstance(out, np.ndarray) else data
    _write(fits.HDUList([fits.PrimaryHDU(data=data, header=_strip_axes(header))]), dest)


def _strip_axes(header: fits.Header) -> fits.Header:
    header = header.copy()
    for k in ("NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "BITPIX", "BSCALE", "BZERO"):
        header.remove(k, ignore_missing=True)
    return header


def _dr1(src_image: Path, dest: Path, c0: float | None = None, c1: float | None = None) -> None:
    """A DR1-style image (row 2 the subcontinuum, wavelength from COEFF0/COEFF1) from a 5 x N image."""
    with _load(src_image) as h:
        data = np.array(h[0].data, dtype=np.float32)
        header = _strip_axes(h[0].header)
    lw = np.log10(data[2].astype(np.float64))
    header["COEFF0"] = float(lw[0]) if c0 is None else c0
    header["COEFF1"] = float(np.mean(np.diff(lw))) if c1 is None else c1
    header["EXTEN0"] = "Flux Inverse Subcontinuum Andmask Ormask"
    data[2] = 1.0
    _write(fits.HDUList([fits.PrimaryHDU(data=data, header=header)]), dest)


def _patch_card(src: Path, dest: Path, key: str, value: str, hdu: int = 0) -> None:
    """Byte-level edit of one header card (to make headers astropy would refuse to write)."""
    raw = bytearray(src.read_bytes())
    start = 0
    for _ in range(hdu):
        end = raw.index(b"END" + b" " * 77, start)
        start = end + 80
        start += -start % 2880
        with _load(src) as h:
            size = h[hdu - 1]._data_size if hdu - 1 else 0
        start += size + (-size % 2880)
    pos = start
    while raw[pos : pos + 8].rstrip() != key.encode() and raw[pos : pos + 3] != b"END":
        pos += 80
    card = f"{key:<8}= {value:>20}".encode("latin-1")
    raw[pos : pos + 80] = card.ljust(80, b" ")[:80]
    dest.write_bytes(bytes(raw))


def _table_naxis2(src: Path, dest: Path, value: int) -> None:
    """Declare ``value`` rows in the COADD table header (the data do not follow: a huge truncated file)."""
    raw = bytearray(src.read_bytes())
    first_end = raw.index(b"END" + b" " * 77)
    pos = raw.index(b"NAXIS2  =", first_end)
    raw[pos : pos + 80] = f"NAXIS2  = {value:>20}".encode().ljust(80, b" ")
    dest.write_bytes(bytes(raw))


def _rows(n: int, good: np.ndarray) -> np.ndarray:
    return np.repeat(good[None, :], n, axis=0)


@dataclass
class FitsSources:
    """Good files the FITS cases are derived from."""

    table: Path
    image: Path
    mrs: Path | None = None
    real_table: Path | None = None
    real_gz: Path | None = None
    real_dr1: Path | None = None


def _fits_cases() -> list[Case]:
    T = "table"

    def tv(fn: Callable[[dict[str, np.ndarray], fits.Header], Any]) -> Callable[[FitsSources, Path], None]:
        return lambda s, d: _table_variant(s.table, d, fn)

    def iv(fn: Callable[[np.ndarray, fits.Header], Any]) -> Callable[[FitsSources, Path], None]:
        return lambda s, d: _image_variant(s.image, d, fn)

    def hv(which: str = T, **cards: Any) -> Callable[[FitsSources, Path], None]:
        return lambda s, d: _header_variant(s.table if which == T else s.image, d, **cards)

    def setcol(name: str, value: Any) -> Callable[[dict[str, np.ndarray], fits.Header], None]:
        def fn(c: dict[str, np.ndarray], h: fits.Header) -> None:
            c[name] = np.full_like(c[name], value) if np.isscalar(value) else value(c[name])

        return fn

    def gz_bytes(s: FitsSources) -> bytes:
        return gzip.compress(s.table.read_bytes(), mtime=0)

    def flip_middle(b: bytes) -> bytes:
        b = bytearray(b)
        for i in range(len(b) // 2, len(b) // 2 + 64):
            b[i] ^= 0xFF
        return bytes(b)

    def two_rows(c: dict[str, np.ndarray], h: fits.Header) -> fits.HDUList:
        cols = [fits.Column(name=k, format=f"{len(v)}{_tform(v)}", array=_rows(2, v)) for k, v in c.items()]
        return fits.HDUList([fits.PrimaryHDU(header=h), fits.BinTableHDU.from_columns(cols, name="COADD")])

    def zero_rows(c: dict[str, np.ndarray], h: fits.Header) -> fits.HDUList:
        cols = [fits.Column(name=k, format=f"{len(v)}E", array=np.zeros((0, len(v)))) for k, v in c.items()]
        return fits.HDUList([fits.PrimaryHDU(header=h), fits.BinTableHDU.from_columns(cols, name="COADD")])

    def in_hdu2(c: dict[str, np.ndarray], h: fits.Header) -> fits.HDUList:
        cols = [fits.Column(name=k, format=f"{len(v)}E", array=v[None, :]) for k, v in c.items()]
        return fits.HDUList(
            [
                fits.PrimaryHDU(header=h),
                fits.ImageHDU(np.zeros(3, dtype=np.float32), name="JUNK"),
                fits.BinTableHDU.from_columns(cols, name="COADD"),
            ]
        )

    def string_flux(c: dict[str, np.ndarray], h: fits.Header) -> fits.HDUList:
        cols = [
            fits.Column(name=k, format=f"{len(v)}E", array=v[None, :]) for k, v in c.items() if k != "FLUX"
        ]
        cols.append(fits.Column(name="FLUX", format="20A", array=np.array(["not a number"])))
        return fits.HDUList([fits.PrimaryHDU(header=h), fits.BinTableHDU.from_columns(cols, name="COADD")])

    def no_ivar(c: dict[str, np.ndarray], h: fits.Header) -> None:
        del c["IVAR"]

    def short_ivar(c: dict[str, np.ndarray], h: fits.Header) -> None:
        c["IVAR"] = c["IVAR"][:1000]

    def header_only(s: FitsSources, d: Path) -> None:
        with _load(s.table) as h:
            _write(fits.HDUList([fits.PrimaryHDU(header=h[0].header)]), d)

    def mrs(s: FitsSources, d: Path) -> None:
        if s.mrs is not None:
            shutil.copy(s.mrs, d)
            return
        with _load(s.table) as h:
            cols = h[1].columns
            prim = fits.PrimaryHDU(header=h[0].header)
            b = fits.BinTableHDU.from_columns(cols, name="COADD_B")
            r = fits.BinTableHDU.from_columns(cols, name="COADD_R")
            _write(fits.HDUList([prim, b, r]), d)

    def write(b: Callable[[FitsSources], bytes]) -> Callable[[FitsSources, Path], None]:
        return lambda s, d: d.write_bytes(b(s))

    def dr1(c0: float | None = None, c1: float | None = None) -> Callable[[FitsSources, Path], None]:
        return lambda s, d: _dr1(s.image, d, c0, c1)

    def dr1_no_coeff(s: FitsSources, d: Path) -> None:
        _dr1(s.image, d)
        with _load(d) as h:
            h[0].header.remove("COEFF0")
            h[0].header.remove("COEFF1")
            h[0].header.remove("EXTEN0")
            _write(h, d)

    def real_gz_truncated(s: FitsSources, d: Path) -> None:
        assert s.real_gz is not None
        b = s.real_gz.read_bytes()
        d.write_bytes(b[: len(b) * 2 // 3])

    def real_table_z(s: FitsSources, d: Path) -> None:
        assert s.real_table is not None
        _header_variant(s.real_table, d, Z=3.0)

    def real_dr1_coeff(s: FitsSources, d: Path) -> None:
        assert s.real_dr1 is not None
        _header_variant(s.real_dr1, d, COEFF1=-1e-4)

    def directory(s: FitsSources, d: Path) -> None:
        d.mkdir()

    def dangling(s: FitsSources, d: Path) -> None:
        d.symlink_to(d.parent / "does-not-exist.fits")

    def loop(s: FitsSources, d: Path) -> None:
        other = d.with_name("zz-loop-b.fits")
        d.symlink_to(other.name)
        other.symlink_to(d.name)

    def patched(key: str, value: str) -> Callable[[FitsSources, Path], None]:
        return lambda s, d: _patch_card(s.image, d, key, value)

    def non_ascii_header(s: FitsSources, d: Path) -> None:
        raw = bytearray(s.table.read_bytes())
        pos = raw.index(b"COMMENT SIMULATED")
        raw[pos + 8 : pos + 16] = "Ä".encode() + b"\xff\xfe\x00\x01\x02\x03"
        d.write_bytes(bytes(raw))

    def no_end(s: FitsSources, d: Path) -> None:
        raw = s.image.read_bytes()
        d.write_bytes(raw.replace(b"END" + b" " * 77, b"XND" + b" " * 77, 1))

    def rng_bytes(n: int) -> Callable[[FitsSources], bytes]:
        return lambda s: np.random.default_rng(n).bytes(n)

    u = REJECT
    cases = [
        # files that are not FITS at all
        Case("empty", u, "empty", write(lambda s: b"")),
        Case("random_bytes", u, "not a FITS file", write(rng_bytes(5000))),
        Case("text_file", u, "not a FITS file", write(lambda s: b"spec,C_FE\nx,0.1\n" * 50)),
        Case("html_error_page", u, "not a FITS file", write(lambda s: b"<html><body>404</body></html>")),
        Case(
            "truncated_half",
            u,
            "truncat",
            write(lambda s: s.table.read_bytes()[: s.table.stat().st_size // 2]),
        ),
        Case("truncated_100_bytes", u, "truncat", write(lambda s: s.table.read_bytes()[:100])),
        Case(
            "truncated_one_block",
            u,
            "truncat|no recognisable|END card",
            write(lambda s: s.table.read_bytes()[:2880]),
        ),
        Case("medium_resolution", u, "medium-resolution", mrs),
        Case("directory_named_fits", u, "directory|no FITS file", directory, extra={"predict": "absent"}),
        Case("dangling_symlink", u, "no such file|cannot be read", dangling),
        Case("symlink_loop", u, "loop|cannot be read|Too many levels", loop, issue_item=2),
        # compression
        Case(
            "gzip_truncated",
            u,
            "compressed file is truncated",
            write(lambda s: gz_bytes(s)[:3000]),
            extra={"suffix": ".fits.gz"},
        ),
        Case(
            "gzip_corrupt",
            u,
            "compressed file is corrupt|truncated",
            write(lambda s: flip_middle(gz_bytes(s))),
            extra={"suffix": ".fits.gz"},
        ),
        Case(
            "gzip_of_random",
            u,
            "not a FITS file",
            write(lambda s: gzip.compress(rng_bytes(4000)(s))),
            extra={"suffix": ".fits.gz"},
        ),
        Case(
            "gzip_twice",
            u,
            "not a FITS file",
            write(lambda s: gzip.compress(gz_bytes(s))),
            extra={"suffix": ".fits.gz"},
        ),
        Case(
            "gzip_empty_payload",
            u,
            "empty",
            write(lambda s: gzip.compress(b"")),
            extra={"suffix": ".fits.gz"},
        ),
        Case(
            "gzip_bad_header",
            u,
            "compressed file is corrupt|truncated",
            write(lambda s: b"\x1f\x8b\x08" + b"\x00" * 40),
        ),
        Case(
            "bz2_corrupt",
            u,
            "compressed file is corrupt|truncated",
            write(lambda s: flip_middle(bz2.compress(s.table.read_bytes()))),
            extra={"suffix": ".fits.bz2"},
        ),
        Case("zlib_not_gzip", u, "not a FITS file", write(lambda s: zlib.compress(s.table.read_bytes()))),
        Case("plain_named_gz", KEPT, "", lambda s, d: shutil.copy(s.table, d), extra={"suffix": ".fits.gz"}),
        Case("gzip_named_fits", KEPT, "", write(gz_bytes)),
        Case("uppercase_suffix", KEPT, "", lambda s, d: shutil.copy(s.table, d), extra={"suffix": ".FITS"}),
        # flux and inverse variance values
        Case("flux_all_nan", u, "", tv(setcol("FLUX", np.nan))),
        Case("flux_all_inf", u, "", tv(setcol("FLUX", np.inf))),
        Case("flux_all_zero", u, "", tv(setcol("FLUX", 0.0))),
        Case("flux_negative", u, "", tv(setcol("FLUX", lambda f: -np.abs(f)))),
        Case("flux_huge", (u, KEPT), "", tv(setcol("FLUX", lambda f: f * 1e35))),
        Case("ivar_all_zero", u, "", tv(setcol("IVAR", 0.0))),
        Case("ivar_all_nan", u, "", tv(setcol("IVAR", np.nan))),
        Case("ivar_negative", u, "", tv(setcol("IVAR", lambda v: -np.abs(v) - 1))),
        Case("ivar_inf", u, "", tv(setcol("IVAR", np.inf))),
        Case("ivar_tiny", u, "snr|SNR", tv(setcol("IVAR", 1e-12))),
        Case("andmask_all_set", (u, KEPT), "", tv(setcol("ANDMASK", 2**20))),
        Case(
            "half_nan_flux",
            (u, KEPT),
            "",
            tv(setcol("FLUX", lambda f: np.where(np.arange(f.size) % 2, np.nan, f))),
        ),
        # wavelength arrays
        Case("wavelength_nan", u, "wavelength", tv(setcol("WAVELENGTH", np.nan))),
        Case("wavelength_decreasing", u, "wavelength", tv(setcol("WAVELENGTH", lambda w: w[::-1].copy()))),
        Case("wavelength_constant", u, "wavelength", tv(setcol("WAVELENGTH", 5000.0))),
        Case("wavelength_in_nm", u, "", tv(setcol("WAVELENGTH", lambda w: w / 10))),
        Case("wavelength_in_metres", u, "", tv(setcol("WAVELENGTH", lambda w: w * 1e-10))),
        # HDU layouts
        Case("table_in_hdu2", (u, KEPT), "", tv(in_hdu2)),
        Case("table_two_rows", u, "rows", tv(two_rows)),
        Case("table_zero_rows", u, "rows|pixel", tv(zero_rows)),
        Case("table_without_ivar", u, "IVAR", tv(no_ivar)),
        Case("table_short_ivar", u, "length|inconsistent", tv(short_ivar)),
        Case("table_flux_int", KEPT, "", tv(setcol("FLUX", lambda f: (f * 100).astype(np.int32)))),
        Case("table_flux_string", u, "", tv(string_flux)),
        Case("header_only", u, "no recognisable|no COADD", header_only),
        Case("image_4xN", u, "", iv(lambda d, h: d[:4])),
        Case("image_1d", u, "", iv(lambda d, h: d[0])),
        Case("image_3d", u, "", iv(lambda d, h: np.stack([d, d]))),
        Case("image_5x10", u, "pixel", iv(lambda d, h: d[:, :10])),
        Case("image_int16", (u, KEPT), "", iv(lambda d, h: d.astype(np.int16))),
        Case("image_transposed", u, "", iv(lambda d, h: d.T.copy())),
        Case("image_no_end_card", u, "", no_end),
        Case("image_naxis1_huge", u, "truncat", patched("NAXIS1", "1000000000")),
        Case("image_bitpix_7", u, "", patched("BITPIX", "7")),
        Case("table_naxis2_huge", u, "truncat|rows", lambda s, d: _table_naxis2(s.table, d, 10**9)),
        # DR1 layout
        Case("dr1_synthetic_ok", KEPT, "", dr1()),
        Case("dr1_coeff1_negative", u, "wavelength", dr1(c1=-1e-4)),
        Case("dr1_coeff0_huge", u, "wavelength", dr1(c0=10.0)),
        Case("dr1_coeff_missing", (u, KEPT), "", dr1_no_coeff),
        # header values
        Case("header_z_huge", u, "", hv(Z=1e30), issue_item=4),
        Case("header_z_minus_one", u, "", hv(Z=-1.0), issue_item=4),
        Case("header_z_half", u, "", hv(Z=0.5), issue_item=4),
        Case("header_z_string", (u, KEPT), "rv|z", hv(Z="abc")),
        Case("header_z_sentinel", (u, KEPT), "rv|z", hv(Z=-9999.0)),
        Case("header_snr_negative", KEPT, "", hv(SNRG=-5.0)),
        Case("header_snr_sentinel", KEPT, "", hv(SNRG=-9999.0)),
        Case("header_snr_huge", KEPT, "", hv(SNRG=1e300)),
        Case("header_obsid_huge", KEPT, "", hv(OBSID=2**70)),
        Case("header_obsid_negative", KEPT, "", hv(OBSID=-1)),
        Case("header_obsid_missing", KEPT, "", hv(OBSID=None)),
        Case("header_obsid_string", KEPT, "", hv(OBSID="12 34 ' x")),
        Case("header_stale_naxis", KEPT, "", hv(NAXIS1=10**9)),
        Case("header_class_galaxy", u, "non_star", hv(CLASS="GALAXY")),
        Case("header_class_qso", u, "non_star", hv(CLASS="QSO")),
        Case("header_non_ascii_bytes", (u, KEPT), "", non_ascii_header),
        # file names
        Case(
            "name_unicode", KEPT, "", lambda s, d: shutil.copy(s.table, d), extra={"name": "spec-é-Ω–星.fits"}
        ),
        Case(
            "name_spaces_quotes",
            KEPT,
            "",
            lambda s, d: shutil.copy(s.table, d),
            extra={"name": "spec 'a' \"b\", c.fits"},
        ),
        Case(
            "name_very_long",
            KEPT,
            "",
            lambda s, d: shutil.copy(s.table, d),
            extra={"name": "s" * 240 + ".fits"},
        ),
        Case(
            "name_leading_dash", KEPT, "", lambda s, d: shutil.copy(s.table, d), extra={"name": "-spec.fits"}
        ),
        # derived from the shared real files
        Case(
            "real_dr8_gz_truncated",
            u,
            "compressed file is truncated",
            real_gz_truncated,
            needs_shared=True,
            extra={"suffix": ".fits.gz"},
        ),
        Case("real_dr10_z_three", u, "", real_table_z, needs_shared=True, issue_item=4),
        Case("real_dr1_coeff1_negative", u, "wavelength", real_dr1_coeff, needs_shared=True),
    ]
    return cases


FITS_CASES = _fits_cases()


def fits_name(case: Case) -> str:
    """File name of a FITS case in the corpus folder."""
    return case.extra.get("name") or f"bad-{case.id}{case.extra.get('suffix', '.fits')}"


def build_fits_cases(src: FitsSources, dest: Path, cases: list[Case] | None = None) -> dict[str, Path]:
    """Write the FITS cases into ``dest``; return case id -> file."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for case in cases if cases is not None else FITS_CASES:
        if case.needs_shared and src.real_table is None:
            continue
        path = dest / fits_name(case)
        assert case.make is not None
        case.make(src, path)
        out[case.id] = path
    return out


# ------------------------------------------------------------------------------------------ catalogues


def _csv_rows(base_csv: Path, n: int = 4) -> tuple[str, list[str]]:
    lines = base_csv.read_text(encoding="utf-8").splitlines()
    return lines[0], lines[1 : n + 1]


def catalogue_cases() -> list[Case]:
    """Reference catalogues for ``preprocess``; ``make(folder, base_csv) -> Path`` writes the CSV."""

    def text(fn: Callable[[str, list[str]], str | bytes]) -> Callable[[Path, Path], Path]:
        def make(folder: Path, base_csv: Path) -> Path:
            head, rows = _csv_rows(base_csv)
            body = fn(head, rows)
            p = folder / "cat.csv"
            p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
            return p

        return make

    def join(head: str, rows: list[str], sep: str = "\n") -> str:
        return sep.join([head, *rows]) + sep

    def col(head: str, rows: list[str], name: str, fn: Callable[[str], str]) -> str:
        cols = head.split(",")
        j = cols.index(name)
        out = []
        for r in rows:
            v = r.split(",")
            v[j] = fn(v[j])
            out.append(",".join(v))
        return join(head, out)

    def rename(head: str, rows: list[str], old: str, new: str) -> str:
        return join(",".join(new if c == old else c for c in head.split(",")), rows)

    def add_col(head: str, rows: list[str], name: str, value: str) -> str:
        return join(head + "," + name, [r + "," + value for r in rows])

    def all_abund(head: str, rows: list[str], value: str) -> str:
        cols = head.split(",")
        idx = [j for j, c in enumerate(cols) if c.upper().endswith("_FE")]
        out = []
        for r in rows:
            v = r.split(",")
            for j in idx:
                v[j] = value
            out.append(",".join(v))
        return join(head, out)

    def spec_row(head: str, rows: list[str], spec: str) -> str:
        v = rows[0].split(",")
        v[0] = spec
        return join(head, [*rows, ",".join(v)])

    def dup_conflict(head: str, rows: list[str]) -> str:
        v = rows[0].split(",")
        v[4] = "0.9"
        return join(head, [*rows, ",".join(v)])

    def quoted_newline(head: str, rows: list[str]) -> str:
        v = rows[0].split(",")
        v[0] = '"spec-\nnewline.fits"'
        return join(head, [*rows, ",".join(v)])

    def latin1(head: str, rows: list[str]) -> bytes:
        v = rows[0].split(",")
        v[0] = "spec-é.fits"
        return join(head, [*rows, ",".join(v)]).encode("latin-1")

    def wide(head: str, rows: list[str]) -> str:
        extra = ",".join(f"x{i}" for i in range(1000))
        return join(head + "," + extra, [r + "," + ",".join(["1"] * 1000) for r in rows])

    def nul(head: str, rows: list[str]) -> bytes:
        return join(head, rows).encode() + b"\x00\x00bad\x00,\x00\n"

    def huge_field(head: str, rows: list[str]) -> str:
        v = rows[0].split(",")
        v[0] = "x" * 200_000
        return join(head, [*rows, ",".join(v)])

    def all_unmatched(head: str, rows: list[str]) -> str:
        return join(head, ["nofile" + r for r in rows])

    def unnamed(head: str, rows: list[str]) -> str:
        return join(head + ",", [r + ",1" for r in rows])

    def extra_cells(head: str, rows: list[str]) -> str:
        return join(head, [rows[0] + ",1,2,3", *rows[1:]])

    return [
        Case("no_spec_column", ERROR, "no 'spec' column", text(lambda h, r: rename(h, r, "spec", "name"))),
        Case("empty_file", ERROR, "catalogue|CSV|empty", text(lambda h, r: "")),
        Case("header_only", ERROR, "no rows|empty|no spectra", text(lambda h, r: h + "\n"), issue_item=3),
        Case("all_rows_unmatched", ERROR, "match|no FITS|no spectra", text(all_unmatched), issue_item=3),
        Case("utf8_bom", OK, "", text(lambda h, r: "\ufeff" + join(h, r))),
        Case("crlf_line_ends", OK, "", text(lambda h, r: join(h, r, "\r\n"))),
        Case(
            "semicolons", (OK, ERROR), "spec|separat|delimit", text(lambda h, r: join(h, r).replace(",", ";"))
        ),
        Case("tabs", (OK, ERROR), "spec|separat|delimit", text(lambda h, r: join(h, r).replace(",", "\t"))),
        Case("duplicate_rows", REJECT, "duplicate", text(lambda h, r: join(h, [*r, r[0]]))),
        Case("conflicting_rows", (REJECT, ERROR), "duplicate|conflict", text(dup_conflict)),
        Case("traversal_parent", REJECT, "escapes", text(lambda h, r: spec_row(h, r, "../../etc/x.fits"))),
        Case("traversal_absolute", REJECT, "escapes", text(lambda h, r: spec_row(h, r, "/etc/passwd"))),
        Case("traversal_inner", REJECT, "escapes", text(lambda h, r: spec_row(h, r, "sub/../../x.fits"))),
        Case(
            "traversal_backslash",
            REJECT,
            "escapes|no FITS",
            text(lambda h, r: spec_row(h, r, "..\\..\\x.fits")),
        ),
        Case(
            "spec_unicode_missing", REJECT, "no FITS", text(lambda h, r: spec_row(h, r, "spec-日本-é.fits"))
        ),
        Case("quoted_newline_in_spec", REJECT, "no FITS", text(quoted_newline)),
        Case("labels_not_numbers", REJECT, "no_labels|label", text(lambda h, r: all_abund(h, r, "high"))),
        Case(
            "label_inf",
            (REJECT, FLAGGED, ERROR),
            "implausible|range|inf",
            text(lambda h, r: col(h, r, "MG_FE", lambda v: "inf")),
            issue_item=4,
        ),
        Case(
            "label_huge",
            (REJECT, FLAGGED, ERROR),
            "implausible|range",
            text(lambda h, r: col(h, r, "MG_FE", lambda v: "1e30")),
            issue_item=4,
        ),
        Case(
            "label_sentinel",
            (REJECT, FLAGGED, ERROR),
            "implausible|range|sentinel",
            text(lambda h, r: col(h, r, "MG_FE", lambda v: "-9999")),
            issue_item=4,
        ),
        Case(
            "teff_negative",
            (REJECT, FLAGGED, ERROR),
            "implausible|range|teff",
            text(lambda h, r: col(h, r, "teff", lambda v: "-5000")),
            issue_item=4,
        ),
        Case(
            "logg_99",
            (REJECT, FLAGGED, ERROR),
            "implausible|range|logg",
            text(lambda h, r: col(h, r, "logg", lambda v: "99")),
            issue_item=4,
        ),
        Case(
            "rv_huge",
            (REJECT, FLAGGED, ERROR),
            "implausible|range|rv",
            text(lambda h, r: col(h, r, "rv", lambda v: "1e9")),
            issue_item=4,
        ),
        Case("rv_text", OK, "", text(lambda h, r: col(h, r, "rv", lambda v: "fast"))),
        Case(
            "collide_case",
            (ERROR, FLAGGED),
            "(?=.*(C_FE))(?=.*(collid|both|duplicate|twice|ambiguous))",
            text(lambda h, r: add_col(h, r, "c_fe", "0.5")),
        ),
        Case(
            "collide_bracket",
            (ERROR, FLAGGED),
            "(?=.*(MG_FE))(?=.*(collid|both|duplicate|twice|ambiguous))",
            text(lambda h, r: add_col(h, r, "[Mg/Fe]", "0.5")),
        ),
        Case(
            "collide_feh",
            (ERROR, FLAGGED),
            "(?=.*(FE_H|fe_h))(?=.*(collid|both|duplicate|twice|ambiguous))",
            text(lambda h, r: add_col(h, r, "[Fe/H]", "0.5")),
        ),
        Case(
            "binary_garbage",
            ERROR,
            "catalogue|CSV|UTF-8|spec",
            text(lambda h, r: np.random.default_rng(3).bytes(3000)),
        ),
        Case("latin1_encoding", (OK, REJECT, ERROR), "UTF-8|encoding|no FITS", text(latin1)),
        Case("nul_bytes", (OK, REJECT, ERROR), "catalogue|CSV|NUL|no FITS", text(nul)),
        Case("huge_field", REJECT, "no FITS", text(huge_field)),
        Case("thousand_columns", OK, "", text(wide)),
        Case("unnamed_column", OK, "", text(unnamed)),
        Case("row_with_extra_cells", (OK, ERROR), "catalogue|CSV|fields", text(extra_cells)),
        Case(
            "spec_empty_values",
            OK,
            "",
            text(lambda h, r: join(h, [*r, "," + r[0].split(",", 1)[1], "nan," + r[0].split(",", 1)[1]])),
        ),
        Case("group_mixed", OK, "", text(lambda h, r: col(h, r, "group", lambda v: "star é ✓"))),
        Case("snr_negative", OK, "", text(lambda h, r: col(h, r, "snr", lambda v: "-3"))),
    ]


CATALOGUE_CASES = catalogue_cases()


# --------------------------------------------------------------------------------------- configurations


def config_cases() -> list[Case]:
    """TOML files for ``--config``; ``make(folder) -> Path``."""

    def toml(body: str | bytes) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            p = folder / "bad.toml"
            p.write_bytes(body if isinstance(body, bytes) else body.encode())
            return p

        return make

    def directory(folder: Path) -> Path:
        p = folder / "dir.toml"
        p.mkdir()
        return p

    return [
        Case("syntax_error", ERROR, "invalid TOML", toml("[training\nepochs = 3\n")),
        Case("unknown_section", ERROR, "unknown section", toml("[trainnig]\nepochs = 3\n")),
        Case("unknown_key", ERROR, "unknown key", toml("[paths]\nfitsdir = 'x'\n")),
        Case("wrong_type", ERROR, "has type", toml("[data]\nseed = 'forty-two'\n")),
        Case("negative_learning_rate", ERROR, "must be > 0", toml("[training]\nlearning_rate = -0.1\n")),
        Case("zero_workers", ERROR, "must be > 0", toml("[preprocess]\nn_workers = 0\n")),
        Case("bad_choice", ERROR, "allowed values", toml("[training]\nscheduler = 'sometimes'\n")),
        Case("section_not_table", ERROR, "must be a table", toml("data = 5\n")),
        Case("bad_split", ERROR, "split_fractions", toml("[data]\nsplit_fractions = [0.5, 0.6, -0.1]\n")),
        Case("wave_range", ERROR, "wave_min", toml("[preprocess]\nwave_min = 9000.0\nwave_max = 4000.0\n")),
        Case("utf8_bom", (OK, ERROR), "TOML", toml(b"\xef\xbb\xbf[training]\nepochs = 1\n")),
        Case("not_utf8", USAGE, "UTF-8", toml(b"[paths]\nfits_dir = '\xff\xfe'\n")),
        Case("binary_garbage", USAGE, "UTF-8", toml(np.random.default_rng(5).bytes(500))),
        Case("missing_file", ERROR, "not found", lambda folder: folder / "nope.toml"),
        Case("directory", USAGE, "directory|file", directory),
        Case("empty_file", OK, "", toml("")),
        Case("crlf", OK, "", toml("[training]\r\nepochs = 1\r\n")),
    ]


CONFIG_CASES = config_cases()


# ---------------------------------------------------------------------------------------- model folders


def _edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def model_cases() -> list[Case]:
    """Model folders for ``predict``/``test``/``analyze --model``; ``make(run_dir, other_run)`` edits a
    copy of a trained run (``other_run`` is a second, differently trained run)."""

    def cfg(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Path], None]:
        return lambda run, other: _edit_json(run / "config.json", fn)

    def without_manifest(fn: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        def make(run: Path, other: Path) -> None:
            fn(run, other)
            (run / "manifest.json").unlink()

        return make

    def rename_labels(c: dict[str, Any]) -> None:
        c["labels"][0], c["labels"][-1] = c["labels"][-1], c["labels"][0]

    def relabel(c: dict[str, Any]) -> None:
        c["labels"] = ["CA_FE" if x == "TEFF" else x for x in c["labels"]]

    def set_std(c: dict[str, Any]) -> None:
        c["label_std"] = [2 * x for x in c["label_std"]]

    def swap_weights(run: Path, other: Path) -> None:
        shutil.copy(other / "model.safetensors", run / "model.safetensors")

    def truncate_weights(run: Path, other: Path) -> None:
        p = run / "model.safetensors"
        p.write_bytes(p.read_bytes()[:1000])

    def pickle_weights(run: Path, other: Path) -> None:
        import pickle

        p = run / "model.safetensors"
        p.write_bytes(pickle.dumps({"__reduce__": "os.system"}))
        _edit_json(run / "manifest.json", lambda m: m["weights"].update(sha256=_sha(p)))

    def rm(name: str) -> Callable[[Path, Path], None]:
        return lambda run, other: (run / name).unlink()

    def write(name: str, data: bytes) -> Callable[[Path, Path], None]:
        return lambda run, other: (run / name).write_bytes(data)

    def ensemble(members: Any) -> Callable[[Path, Path], None]:
        return lambda run, other: (run / "ensemble.json").write_text(json.dumps({"members": members}))

    def calibration(run: Path, other: Path) -> None:
        (run / "calibration.json").write_text("{not json")

    def ood_corrupt(run: Path, other: Path) -> None:
        from specabund.predict.calibration import model_fingerprint
        from specabund.training import load_model

        fp = model_fingerprint(load_model(run))
        (run / "ood_reference.npz").write_bytes(b"PK\x03\x04 broken")
        (run / "calibration.json").write_text(
            json.dumps(
                {
                    "format_version": 1,
                    "modes": {},
                    "label_range": {},
                    "ood": {"file": "ood_reference.npz", "fingerprint": fp},
                }
            )
        )

    def nested_ensemble(run: Path, other: Path) -> None:
        (run / "ensemble.json").write_text(json.dumps({"members": ["."]}))

    return [
        Case("labels_renamed", ERROR, "labels .* differ", cfg(relabel)),
        Case("labels_reordered", ERROR, "labels .* differ", cfg(rename_labels)),
        Case("label_std_edited", ERROR, "changed after training", cfg(set_std)),
        Case(
            "grid_edited",
            ERROR,
            "changed after training",
            cfg(lambda c: c["wavelength"].update(n=c["wavelength"]["n"] + 1)),
        ),
        Case("weights_swapped", ERROR, "weights differ", swap_weights),
        Case("weights_truncated", ERROR, "weights differ", truncate_weights),
        Case("weights_missing", ERROR, "model.safetensors missing", rm("model.safetensors")),
        Case("weights_pickle", ERROR, "cannot load weights", pickle_weights),
        Case("config_missing", ERROR, "not found", rm("config.json")),
        Case("config_invalid_json", ERROR, "invalid JSON", write("config.json", b'{"labels": [')),
        Case("config_is_list", ERROR, "must be a JSON object", write("config.json", b"[1, 2]")),
        Case("config_not_utf8", ERROR, "not UTF-8", write("config.json", b'{"labels": ["\xff"]}')),
        Case(
            "config_labels_missing",
            ERROR,
            "'labels' missing",
            without_manifest(cfg(lambda c: c.pop("labels"))),
        ),
        Case(
            "config_labels_duplicate",
            ERROR,
            "duplicates",
            without_manifest(cfg(lambda c: c["labels"].__setitem__(1, c["labels"][0]))),
        ),
        Case(
            "config_labels_not_strings",
            ERROR,
            "list of label names",
            without_manifest(cfg(lambda c: c.__setitem__("labels", [1, 2]))),
        ),
        Case(
            "config_std_zero",
            ERROR,
            "positive",
            without_manifest(cfg(lambda c: c.__setitem__("label_std", [0.0] * len(c["labels"])))),
        ),
        Case(
            "config_std_short",
            ERROR,
            "one number per label",
            without_manifest(cfg(lambda c: c["label_std"].pop())),
        ),
        Case(
            "config_grid_huge",
            ERROR,
            "outside",
            without_manifest(cfg(lambda c: c["wavelength"].update(n=10**12))),
        ),
        Case(
            "config_model_unknown",
            ERROR,
            "model",
            without_manifest(cfg(lambda c: c["model"].update(name="no_such_net"))),
        ),
        Case(
            "config_model_bad_key",
            ERROR,
            "model",
            without_manifest(cfg(lambda c: c["model"].update(wings=3))),
        ),
        Case("manifest_missing", OK, "", rm("manifest.json")),
        Case("manifest_invalid", ERROR, "invalid JSON", write("manifest.json", b"{")),
        Case("manifest_is_list", ERROR, "manifest", write("manifest.json", b"[]")),
        Case("ensemble_traversal", ERROR, "not a folder name", ensemble(["../../etc"])),
        Case("ensemble_empty", ERROR, "non-empty", ensemble([])),
        Case("ensemble_invalid", ERROR, "invalid JSON", write("ensemble.json", b"{]")),
        Case("ensemble_self", ERROR, "not a folder name", nested_ensemble),
        Case("calibration_invalid", ERROR, "invalid JSON", calibration, extra={"predict_only": True}),
        Case(
            "ood_reference_corrupt",
            (OK, ERROR),
            "ood|OOD|reference",
            ood_corrupt,
            extra={"predict_only": True},
        ),
    ]


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


MODEL_CASES = model_cases()


# ------------------------------------------------------------------------------------------- datasets


def dataset_cases() -> list[Case]:
    """Broken ``.npz`` datasets for ``--data-path``; ``make(folder, good_npz) -> Path``."""

    def edit(
        fn: Callable[[dict[str, np.ndarray]], None], allow_pickle: bool = False
    ) -> Callable[[Path, Path], Path]:
        def make(folder: Path, good: Path) -> Path:
            with np.load(good, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            fn(arrays)
            p = folder / "data.npz"
            np.savez(p, **arrays)
            return p

        return make

    def raw(fn: Callable[[bytes], bytes]) -> Callable[[Path, Path], Path]:
        def make(folder: Path, good: Path) -> Path:
            p = folder / "data.npz"
            p.write_bytes(fn(good.read_bytes()))
            return p

        return make

    def objects(a: dict[str, np.ndarray]) -> None:
        a["spec"] = np.array([{"x": 1}] * len(a["spec"]), dtype=object)

    def setk(key: str, value: Any) -> Callable[[dict[str, np.ndarray]], None]:
        def fn(a: dict[str, np.ndarray]) -> None:
            a[key] = value(a[key]) if callable(value) else value

        return fn

    def nan_rows(a: dict[str, np.ndarray]) -> None:
        a["X"][0] = np.nan

    return [
        Case("truncated", ERROR, "data|npz|zip|truncat|read", raw(lambda b: b[: len(b) // 2])),
        Case("not_a_zip", ERROR, "data|npz|zip|read", raw(lambda b: b"hello" * 100)),
        Case("empty", ERROR, "data|npz|zip|empty|read", raw(lambda b: b"")),
        Case("object_array", ERROR, "pickle|object|data", edit(objects)),
        Case("missing_X", ERROR, "X", edit(lambda a: a.pop("X"))),
        Case("X_strings", (OK, ERROR), "X|dtype|float", edit(setk("X", lambda x: x.astype(str)))),
        Case("X_wrong_shape", ERROR, "shape|X|pixels|rows", edit(setk("X", lambda x: x[:, :-5]))),
        Case("elements_mismatch", ERROR, "elements|label|y", edit(setk("elements", np.array(["C_FE"])))),
        Case("X_nan_row", (OK, ERROR), "NaN|finite", edit(nan_rows)),
    ]


DATASET_CASES = dataset_cases()


def all_case_ids() -> dict[str, list[str]]:
    """Case ids by group (for the report)."""
    return {
        "fits": [c.id for c in FITS_CASES],
        "catalogue": [c.id for c in CATALOGUE_CASES],
        "config": [c.id for c in CONFIG_CASES],
        "model": [c.id for c in MODEL_CASES],
        "dataset": [c.id for c in DATASET_CASES],
    }


def make_readonly(path: Path) -> Callable[[], None]:
    """Make ``path`` read-only for this process; return the function undoing it.

    As root, permissions do not stop writes: a read-only tmpfs is mounted on it when possible (else the
    caller must skip); otherwise the folder is chmod-ed 0555.
    """
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        import subprocess

        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
        )
        if r.returncode != 0:
            raise OSError(f"cannot mount a read-only tmpfs on {path}: {r.stderr.decode().strip()}")
        return lambda: subprocess.run(["umount", str(path)], check=False)
    path.chmod(0o555)
    return lambda: path.chmod(0o755)


# ------------------------------------------------------------------------------------------ kill points

KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import corpus
corpus.main_with_kill_point({target!r}, {nth!r}, {argv!r}, {match!r})
"""


def main_with_kill_point(target: str, nth: int, argv: list[str], match: str = "") -> None:
    """Run the ``specabund`` command line with ``target`` (``'module:attr'`` or ``'module:Class.method'``)
    replaced by a wrapper that kills this process (SIGKILL, like ``kill -9``) when it is called for the
    ``nth`` time, before the call runs (with ``match``, only calls whose first argument contains it count).
    Figures are not rendered (speed)."""
    import importlib
    import signal

    from matplotlib.figure import Figure

    Figure.savefig = _stub_savefig  # type: ignore[method-assign]
    module_name, attr = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if match and not (args and match in str(args[0])):
            return original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    from specabund.cli import main

    main(argv, prog_name="specabund")


def _stub_savefig(self: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
    data = b"\x89PNG\r\n\x1a\n(figure not rendered in the fault tests)"
    if hasattr(fname, "write"):
        fname.write(data)
    else:
        Path(fname).write_bytes(data)


def run_killed(target: str, nth: int, argv: list[str], timeout: float = 300, match: str = "") -> Any:
    """Run the command line in a subprocess that is killed at the ``nth`` call of ``target``."""
    import subprocess
    import sys

    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent), target=target, nth=nth, argv=argv, match=match
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )


# ------------------------------------------------------------------------------ the shared workdir

TRAIN_FAST = ["--model-name", "rescnn_small", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
PREDICT_FAST = ["--mc-samples", "2", "--no-plots", "--device", "cpu"]


def cli(workdir: Path, *args: str) -> Any:
    """Run ``specabund --workdir WORKDIR ARGS`` in-process."""
    from click.testing import CliRunner

    from specabund.cli import main

    return CliRunner().invoke(main, ["--workdir", str(workdir), *args])


@dataclass
class Base:
    """A simulated workdir: FITS files, catalogues, preprocessed data and two tiny models."""

    root: Path
    fits: Path
    reference_csv: Path
    prediction_csv: Path
    processed: Path
    model: Path
    other_model: Path


_CACHE: dict[str, Any] = {}


def _build_base(root: Path) -> Base:
    from matplotlib.figure import Figure

    from specabund.simulate import simulate_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", _stub_savefig)
        simulate_dataset(24, root / "sim", seed=11, layout="mixed", prediction_fraction=0.25)
        r = cli(
            root,
            "preprocess",
            "--reference-csv",
            "sim/X_FE.csv",
            "--prediction-csv",
            "sim/galah_X_FE.csv",
            "--fits-dir",
            "sim/fits",
            "--no-plots",
        )
        assert r.exit_code == 0, r.output
        for name, seed in (("tiny", "1"), ("tiny2", "2")):
            r = cli(
                root, "train", "--elements", "C_FE", "MG_FE", *TRAIN_FAST, "--run-name", name, "--seed", seed
            )
            assert r.exit_code == 0, r.output
    return Base(
        root=root,
        fits=root / "sim" / "fits",
        reference_csv=root / "sim" / "X_FE.csv",
        prediction_csv=root / "sim" / "galah_X_FE.csv",
        processed=root / "processed_data",
        model=root / "models" / "tiny",
        other_model=root / "models" / "tiny2",
    )


def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """The simulated workdir with its two tiny models, built once per test session."""
    if "base" not in _CACHE:
        _CACHE["base"] = _build_base(tmp_path_factory.mktemp("corpus_base"))
    return _CACHE["base"]
