"""The raw-bytes header path of ``read_lamost`` gives exactly what the astropy path gives, or steps aside.

``read_lamost`` first parses headers straight from the bytes (:mod:`specabund.io.rawfits`) and falls back
to astropy on any doubt or failure. These tests hold the two paths to the same result on every real file,
on simulated files of every layout and on every broken or odd file of the fault corpus, and hold the card
parser to astropy's value for cards astropy writes.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

import corpus
from specabund.errors import FitsFormatError
from specabund.io import lamost
from specabund.io.rawfits import NeedAstropy, RawHDUList, RawHeader

ARRAYS = ("wavelength", "flux", "ivar", "andmask", "ormask")


def _outcome(read, path: Path) -> tuple[str, object]:
    try:
        return "ok", read(path)
    except FitsFormatError as exc:
        return "error", str(exc)


def _astropy(path: Path) -> object:
    return lamost._read_astropy(path, lamost._load_bytes(path))


def _raw_only(path: Path) -> object:
    """The raw path alone (no fallback): NeedAstropy propagates."""
    raw = lamost._load_bytes(path)
    return lamost._dispatch(RawHDUList(raw), path, raw)


def assert_same(path: Path) -> str:
    """read_lamost and the astropy path agree on ``path``; return 'raw' when the raw path read it."""
    got, want = _outcome(lamost.read_lamost, path), _outcome(_astropy, path)
    assert got[0] == want[0], (path, got, want)
    if got[0] == "error":
        assert got[1] == want[1]
        return "error"
    for name in ARRAYS:
        a, b = getattr(got[1], name), getattr(want[1], name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (path, name)
    assert got[1].meta == want[1].meta, path
    try:
        _raw_only(path)
    except (NeedAstropy, FitsFormatError, ValueError, KeyError, IndexError, TypeError, OSError):
        return "astropy"
    return "raw"


@pytest.mark.shared
@pytest.mark.parametrize("folder", ["dr10-table", "dr8-repeats", "dr1-subcontinuum", "misc", "dr10-lasp"])
def test_every_real_file_same_on_both_paths(lamost_dir: Path, folder: str) -> None:
    files = lamost.iter_fits_files(lamost_dir / folder)
    assert files
    paths = [assert_same(f) for f in files]
    # the point of the raw path: every real low-resolution file takes it (only the MRS file is refused)
    refused = [f.name for f, p in zip(files, paths, strict=True) if p != "raw"]
    assert refused == ([f.name for f in files if f.name.startswith("med-")] if folder == "misc" else [])


@pytest.mark.parametrize("layout", ["table", "image"])
def test_simulated_layouts_same_on_both_paths(tmp_path: Path, layout: str) -> None:
    from specabund.simulate import simulate_dataset

    simulate_dataset(6, tmp_path, seed=5, layout=layout, gzip=layout == "image", prediction_fraction=0.0)
    files = lamost.iter_fits_files(tmp_path / "fits")
    assert [assert_same(f) for f in files] == ["raw"] * len(files)


def test_fault_corpus_same_on_both_paths(tmp_path: Path) -> None:
    from conftest import LAMOST_DIR
    from specabund.simulate import simulate_dataset

    simulate_dataset(2, tmp_path / "t", seed=1, layout="table", prediction_fraction=0.0)
    simulate_dataset(2, tmp_path / "i", seed=2, layout="image", prediction_fraction=0.0)
    src = corpus.FitsSources(
        table=lamost.iter_fits_files(tmp_path / "t" / "fits")[0],
        image=lamost.iter_fits_files(tmp_path / "i" / "fits")[0],
    )
    if LAMOST_DIR.is_dir():
        src.mrs = next((LAMOST_DIR / "misc").glob("med-*"), None)
        src.real_table = sorted((LAMOST_DIR / "dr10-table").glob("*.fits"))[0]
        src.real_gz = sorted((LAMOST_DIR / "dr8-repeats").glob("*.fits.gz"))[0]
        src.real_dr1 = sorted((LAMOST_DIR / "dr1-subcontinuum").glob("*.fits"))[0]
    built = corpus.build_fits_cases(src, tmp_path / "cases")
    assert len(built) > 20
    seen = {}
    for case_id, path in built.items():
        if path.is_dir() or not path.exists() or path.is_symlink():
            continue
        seen[case_id] = assert_same(path)
    # both paths are exercised: broken files fail the same way, plain variants take the raw path
    assert {"error", "raw"} <= set(seen.values())


# ---------------------------------------------------------------------------------------- card parser

_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ./-_'&()", max_size=60)
_VALUES = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    _TEXT,
)


@settings(max_examples=300, deadline=None)
@given(value=_VALUES, comment=_TEXT)
def test_card_values_match_astropy(value: object, comment: str) -> None:
    header = fits.Header()
    header["KEY"] = (value, comment)
    header["OTHER"] = 1
    block = header.tostring(padding=False).encode("ascii")
    try:
        raw = RawHeader(block)
    except NeedAstropy:
        return  # (long strings that astropy writes with CONTINUE cards): astropy reads those
    want = fits.Header.fromstring(block.decode("ascii"))["KEY"]
    got = raw["KEY"]
    assert type(got) is type(want) and got == want, (value, got, want)


def test_card_parser_details() -> None:
    cards = [
        "SIMPLE  =                    T",
        "NAME    = 'O''Brien  '         / a quote, trailing blanks",
        "SLASH   = 'a/b'                / slash inside the string",
        "DEXP    =              1.5D+02",
        "UNDEF   =",
        "DUP     =                    1",
        "DUP     =                    2",
        "COMMENT = not a value card",
        "HISTORY   anything",
    ]
    h = RawHeader("".join(c.ljust(80) for c in cards).encode("ascii"))
    assert h["NAME"] == "O'Brien" and h["SLASH"] == "a/b" and h["DEXP"] == 150.0
    assert "UNDEF" in h and h["UNDEF"] is None
    assert h["DUP"] == 1  # the first card wins, as in astropy
    assert "COMMENT" not in h and h.get("missing", 7) == 7
    assert h["dexp"] == 150.0  # look-ups are case-insensitive, as in astropy
    ref = fits.Header.fromstring("".join(c.ljust(80) for c in cards))
    assert h["NAME"] == ref["NAME"] and h["DEXP"] == ref["DEXP"] and h["DUP"] == ref["DUP"]


@pytest.mark.parametrize(
    "card",
    [
        "LONG    = 'abc&'",  # followed by CONTINUE below
        "BAD     = 1.2.3",
        "CPLX    = (1.0, 2.0)",
        "ODD     = 'unterminated",
        "lower   =                    3",  # astropy fixes non-standard keywords
    ],
)
def test_card_parser_steps_aside(card: str) -> None:
    text = card.ljust(80) + ("CONTINUE  'def'".ljust(80) if card.startswith("LONG") else "")
    with pytest.raises(NeedAstropy):
        RawHeader(text.encode("ascii"))


def test_non_ascii_and_missing_end_step_aside() -> None:
    with pytest.raises(NeedAstropy):
        RawHeader(("NAME    = 'caf\u00e9'".ljust(80)).encode("latin-1"))
    cards = ("SIMPLE  =                    T", "BITPIX  =                    8")
    block = "".join(c.ljust(80) for c in cards).ljust(2880)
    with pytest.raises(NeedAstropy, match="END"):
        RawHDUList(block.encode("ascii"))[0]
