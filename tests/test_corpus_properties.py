"""Property-based tests (Hypothesis) of the catalogue parser and of the FITS reader's header handling.

Whatever the bytes, ``read_catalog`` returns a catalogue or raises ``CatalogError``; whatever the header
values, ``read_lamost`` returns a spectrum whose ``meta`` values have their documented types (or raises
``FitsFormatError``): never another exception.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from specabund.catalog import read_catalog
from specabund.errors import CatalogError, FitsFormatError, SpecabundError
from specabund.io import read_lamost

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hypothesis")


# ------------------------------------------------------------------------------------------ catalogue

CSV_ALPHABET = st.sampled_from([*string.printable, "\ufeff", "é", "\x00", ";", "\t", "\r", '"', "[", "/"])


@SETTINGS
@given(text=st.text(CSV_ALPHABET, max_size=400))
def test_any_text_is_a_catalogue_or_a_catalog_error(text: str, scratch: Path) -> None:
    path = scratch / "any.csv"
    path.write_text(text, encoding="utf-8")
    for require in (True, False):
        try:
            cat = read_catalog(path, None, require_labels=require)
        except SpecabundError as exc:
            assert isinstance(exc, CatalogError) or str(path) in str(exc)
            continue
        assert "spec" in cat.table.columns
        assert all(isinstance(s, str) and s == s.strip() and s for s in cat.table["spec"])


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_are_a_catalogue_or_a_catalog_error(data: bytes, scratch: Path) -> None:
    path = scratch / "bytes.csv"
    path.write_bytes(b"spec,C_FE\n" + data)
    try:
        read_catalog(path, None, require_labels=False)
    except SpecabundError:
        pass


NAME = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=30).filter(
    lambda s: s.strip(".") != "" and s.lower() not in ("nan", "none", "null", "n/a", "na")
)
# plausible [X/Fe] values (implausible ones are masked by the catalogue's own checks)
VALUE = st.floats(min_value=-1.5, max_value=1.5, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(NAME, VALUE, st.one_of(st.none(), VALUE)), min_size=1, max_size=12, unique_by=lambda r: r[0]
    ),
    pad=st.booleans(),
    crlf=st.booleans(),
)
def test_well_formed_catalogues_round_trip(
    rows: list[tuple[str, float, float | None]], pad: bool, crlf: bool, scratch: Path
) -> None:
    df = pd.DataFrame(
        {
            "spec": [r[0] for r in rows],
            "C_FE": [r[1] for r in rows],
            "mg_fe": [np.nan if r[2] is None else r[2] for r in rows],
        }
    )
    if pad:
        df["spec"] = "  " + df["spec"] + " "
    path = scratch / "good.csv"
    df.to_csv(path, index=False, lineterminator="\r\n" if crlf else "\n")
    cat = read_catalog(path, None, require_labels=True)
    assert cat.elements == ["C_FE", "MG_FE"]
    assert cat.table["spec"].tolist() == [r[0] for r in rows]
    np.testing.assert_array_equal(cat.labels(["C_FE"])[:, 0], [r[1] for r in rows])
    np.testing.assert_array_equal(
        cat.labels(["MG_FE"])[:, 0], [np.nan if r[2] is None else r[2] for r in rows]
    )


# ----------------------------------------------------------------------------------------- FITS header


def _spectrum_file(path: Path, cards: dict[str, object]) -> None:
    n = 400
    wl = 3800.0 * 10 ** (1e-4 * np.arange(n))
    cols = [
        fits.Column(name="FLUX", format=f"{n}E", array=np.ones((1, n))),
        fits.Column(name="IVAR", format=f"{n}E", array=np.full((1, n), 100.0)),
        fits.Column(name="WAVELENGTH", format=f"{n}D", array=wl[None, :]),
        fits.Column(name="ANDMASK", format=f"{n}J", array=np.zeros((1, n), dtype=np.int32)),
        fits.Column(name="ORMASK", format=f"{n}J", array=np.zeros((1, n), dtype=np.int32)),
    ]
    prim = fits.PrimaryHDU()
    for k, v in cards.items():
        prim.header[k] = v
    fits.HDUList([prim, fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(path, overwrite=True)


HEADER_TEXT = st.text(string.ascii_letters + string.digits + " -+.,:/()'", max_size=60)
HEADER_VALUE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    HEADER_TEXT,
)
KEYS = [
    "OBSID",
    "Z",
    "Z_ERR",
    "RA",
    "DEC",
    "CLASS",
    "SUBCLASS",
    "DESIG",
    "FILENAME",
    "DATA_V",
    "SNRU",
    "SNRG",
    "SNRR",
    "SNRI",
    "SNRZ",
    "SN_G",
]


@SETTINGS
@given(cards=st.dictionaries(st.sampled_from(KEYS), HEADER_VALUE, max_size=8))
def test_header_values_of_any_type_give_typed_meta(cards: dict[str, object], scratch: Path) -> None:
    path = scratch / "h.fits"
    try:
        _spectrum_file(path, cards)
    except (ValueError, TypeError, OverflowError):
        assume(False)  # astropy itself refuses to write such a card
    try:
        spec = read_lamost(path)
    except FitsFormatError:
        return
    m = spec.meta
    assert m["obsid"] is None or isinstance(m["obsid"], int)
    for key in ("z", "z_err", "ra", "dec", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z"):
        v = m[key]
        assert v is None or (isinstance(v, float) and math.isfinite(v) and v > -999), (key, v)
    for key in ("class", "subclass", "designation"):
        assert m[key] is None or (isinstance(m[key], str) and m[key] == m[key].strip() and m[key])
    assert isinstance(m["filename"], str) and m["filename"]
    assert m["data_release"] is None or m["data_release"].startswith("DR")
    assert len(spec.flux) == 400


CARD_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=80)


@SETTINGS
@given(card=CARD_TEXT, key=st.sampled_from(["OBSID", "Z", "SNRG", "CLASS", "NAXIS", "BITPIX", "END"]))
def test_raw_header_cards_never_crash_the_reader(card: str, key: str, scratch: Path) -> None:
    """Overwrite a card with arbitrary printable text (what a broken writer may leave)."""
    path = scratch / "raw.fits"
    _spectrum_file(path, {"OBSID": 1, "Z": 0.0, "SNRG": 50.0, "CLASS": "STAR"})
    raw = bytearray(path.read_bytes())
    pos = 0
    while raw[pos : pos + 8].rstrip() != key.encode() and pos < 2880:
        pos += 80
    if pos >= 2880:
        pos = 80 * 5
    raw[pos : pos + 80] = card.encode("ascii").ljust(80)[:80]
    path.write_bytes(bytes(raw))
    try:
        spec = read_lamost(path)
    except FitsFormatError as exc:
        assert str(path) in str(exc)
        return
    assert spec.meta["obsid"] is None or isinstance(spec.meta["obsid"], int)
    assert spec.meta["z"] is None or math.isfinite(spec.meta["z"])
