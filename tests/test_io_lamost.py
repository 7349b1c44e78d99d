"""Tests of the LAMOST low-resolution FITS reader on the real files in ../shared/data/lamost and on
small FITS files built from them (or from scratch) in tmp_path."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from specabund.errors import FitsFormatError
from specabund.io import iter_fits_files, read_lamost
from specabund.io import lamost as lamost_module

FOLDERS = {"dr10-table": 25, "dr8-repeats": 56, "dr1-subcontinuum": 20, "misc": 4}
EXPECTED_LAYOUT = {
    "dr10-table": "dr9_table",
    "dr8-repeats": "image_5xN",
    "dr1-subcontinuum": "dr1_subcontinuum",
}
DR10_FILE = "dr10-table/3703110.fits"
DR8_FILE = "dr8-repeats/spec-55859-F5902_sp03-232.fits.gz"
DR1_FILE = "dr1-subcontinuum/spec-55862-B6212_sp06-003.fits"
DR2_FILE = "misc/spec-56769-HD184250N365730V_sp16-027.fits"
DR6_FILE = "misc/spec-57287-KP193637N444141V03_sp10-161.fits.gz"
DR7_FILE = "misc/spec-58397-EG014118N254444M01_sp03-031.fits"
MRS_FILE = "misc/med-58268-HIP95119KP01_sp12-076.fits.gz"
SNR_KEYS = {"snr_u": "U", "snr_g": "G", "snr_r": "R", "snr_i": "I", "snr_z": "Z"}


def _is_mrs(path: Path) -> bool:
    return path.name.startswith("med-")


def _check_spectrum(spec, path: Path) -> None:
    assert spec.wavelength.dtype == np.float64
    assert spec.flux.dtype == np.float64 and spec.ivar.dtype == np.float64
    assert spec.andmask.dtype == np.int32 and spec.ormask.dtype == np.int32
    n = len(spec.wavelength)
    assert 3700 <= n <= 3910, path
    for arr in (spec.flux, spec.ivar, spec.andmask, spec.ormask):
        assert arr.shape == (n,)
    assert np.all(np.diff(spec.wavelength) > 0), path
    assert spec.wavelength[0] >= 3690 and spec.wavelength[-1] <= 9110, path
    good = spec.ivar > 0
    assert good.sum() > 0.5 * n, path
    assert np.all(np.isfinite(spec.flux[good])), path
    assert np.all(np.isfinite(spec.ivar)) and np.all(spec.ivar >= 0), path
    assert spec.meta["path"] == str(path)
    assert spec.meta["filename"].startswith("spec-")
    assert spec.meta["class"] == "STAR"
    assert spec.meta["designation"].startswith("LAMOST J")
    assert 0 <= spec.meta["ra"] < 360 and -90 <= spec.meta["dec"] <= 90


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.shared
@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_real_file_reads(lamost_dir: Path, folder: str) -> None:
    files = iter_fits_files(lamost_dir / folder)
    assert len(files) == FOLDERS[folder]
    for path in files:
        if _is_mrs(path):
            with pytest.raises(FitsFormatError, match="medium-resolution"):
                read_lamost(path)
            continue
        spec = read_lamost(path)
        _check_spectrum(spec, path)
        if folder in EXPECTED_LAYOUT:
            assert spec.meta["layout"] == EXPECTED_LAYOUT[folder], path


@pytest.mark.shared
def test_mrs_refusal_message_names_path_and_reason(lamost_dir: Path) -> None:
    path = lamost_dir / MRS_FILE
    with pytest.raises(FitsFormatError) as info:
        read_lamost(path)
    assert info.value.path == str(path)
    assert "medium-resolution (MRS) spectrum" in str(info.value)
    assert "low-resolution spectra only" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.shared
def test_each_real_file_matches_exactly_one_reader(lamost_dir: Path) -> None:
    for path in iter_fits_files(lamost_dir):
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            matched = [r.name for r in lamost_module._READERS if r.identify(hdul)]
        assert len(matched) == 1, (path, matched)
        assert (matched[0] == "mrs_refused") == _is_mrs(path)


@pytest.mark.shared
def test_dr10_metadata(lamost_dir: Path) -> None:
    for path in iter_fits_files(lamost_dir / "dr10-table"):
        spec = read_lamost(path)
        header = fits.getheader(path, 0)
        meta = spec.meta
        assert meta["obsid"] == int(path.name.split(".")[0])
        assert meta["filename"] == header["FILENAME"]
        assert meta["data_release"] == "DR10"
        assert meta["z"] == pytest.approx(header["Z"])
        assert meta["z_err"] == pytest.approx(header["Z_ERR"])
        for key, band in SNR_KEYS.items():
            assert meta[key] == pytest.approx(header[f"SNR{band}"])
        assert 6.5 < meta["snr_g"] < 27
        # the table's own wavelength column is used, not the header log-linear solution
        with fits.open(path) as hdul:
            assert np.array_equal(spec.wavelength, hdul["COADD"].data["WAVELENGTH"][0].astype(np.float64))


@pytest.mark.shared
def test_image_metadata_dr8_dr6_dr7(lamost_dir: Path) -> None:
    expected = {
        DR8_FILE: ("DR8", 103232, 94.11),
        DR6_FILE: ("DR6", 359910161, 87.63),
        DR7_FILE: ("DR7", 677503031, 153.72),
    }
    for name, (release, obsid, snr_g) in expected.items():
        spec = read_lamost(lamost_dir / name)
        assert spec.meta["data_release"] == release
        assert spec.meta["obsid"] == obsid
        assert spec.meta["snr_g"] == pytest.approx(snr_g)
        assert spec.meta["layout"] == "image_5xN"
        with fits.open(lamost_dir / name) as hdul:
            data = hdul[0].data
        assert np.array_equal(spec.wavelength, data[2].astype(np.float64))
        assert np.array_equal(spec.flux, data[0].astype(np.float64))


@pytest.mark.shared
def test_dr1_wavelength_comes_from_coefficients_not_row_2(lamost_dir: Path) -> None:
    for path in iter_fits_files(lamost_dir / "dr1-subcontinuum"):
        spec = read_lamost(path)
        with fits.open(path) as hdul:
            header = hdul[0].header
            data = hdul[0].data
        i = np.arange(data.shape[1])
        expected = 10.0 ** (header["COEFF0"] + i * header["COEFF1"])
        np.testing.assert_allclose(spec.wavelength, expected, rtol=1e-12)
        # row 2 is the subcontinuum (around 1), nowhere near a wavelength
        assert not np.allclose(spec.wavelength, data[2])
        assert np.nanmax(data[2]) < 100
        assert np.array_equal(spec.flux, data[0].astype(np.float64))
        assert spec.meta["snr_g"] == pytest.approx(header["SN_G"])
        assert spec.meta["snr_u"] == pytest.approx(header["SN_U"])
        assert spec.meta["obsid"] is None
        assert spec.meta["data_release"] is None
        assert spec.meta["z"] == pytest.approx(header["Z"])


@pytest.mark.shared
def test_dr2_without_obsid_or_data_release(lamost_dir: Path) -> None:
    spec = read_lamost(lamost_dir / DR2_FILE)
    assert spec.meta["obsid"] is None
    assert spec.meta["data_release"] is None
    assert spec.meta["layout"] == "image_5xN"
    assert spec.meta["filename"] == "spec-56769-HD184250N365730V_sp16-027.fits"
    # this header has no SNRU..SNRZ cards; its SNR is in the DR1-style SN_U..SN_Z cards
    assert spec.meta["snr_g"] == pytest.approx(46.76)


@pytest.mark.shared
def test_header_without_obsid_or_snr_gives_none(lamost_dir: Path, tmp_path: Path) -> None:
    with fits.open(lamost_dir / DR7_FILE) as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data.copy()
    for key in ["OBSID", "DATA_V", "Z_ERR", "FILENAME", *(f"SNR{b}" for b in "UGRIZ")]:
        del header[key]
    header["Z"] = -9999.0  # LAMOST's missing-value sentinel
    out = tmp_path / "stripped.fits"
    fits.PrimaryHDU(data, header).writeto(out)
    spec = read_lamost(out)
    for key in ["obsid", "data_release", "z", "z_err", *SNR_KEYS]:
        assert spec.meta[key] is None, key
    assert spec.meta["filename"] == "stripped.fits"
    assert spec.meta["subclass"] == "G3"


@pytest.mark.shared
def test_gzip_and_bzip2_equal_plain(lamost_dir: Path, tmp_path: Path) -> None:
    src = lamost_dir / DR8_FILE
    plain = tmp_path / "plain.fits"
    plain.write_bytes(gzip.decompress(src.read_bytes()))
    packed = tmp_path / "packed.fits.bz2"
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    reference = read_lamost(src)
    for other in (read_lamost(plain), read_lamost(packed)):
        for name in ("wavelength", "flux", "ivar", "andmask", "ormask"):
            assert np.array_equal(getattr(reference, name), getattr(other, name)), name
        assert other.meta["obsid"] == reference.meta["obsid"]


@pytest.mark.shared
@pytest.mark.parametrize("name", [DR10_FILE, DR8_FILE, DR1_FILE, DR2_FILE])
def test_fast_path_equals_astropy_path(lamost_dir: Path, name: str) -> None:
    path = lamost_dir / name
    fast = read_lamost(path)
    with fits.open(path) as hdul:
        slow = lamost_module._dispatch(hdul, path, None)
    for attr in ("wavelength", "flux", "ivar", "andmask", "ormask"):
        assert np.array_equal(getattr(fast, attr), getattr(slow, attr)), attr
    assert fast.meta == slow.meta


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FitsFormatError, match="no such file"):
        read_lamost(tmp_path / "absent.fits")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    with pytest.raises(FitsFormatError, match="empty") as info:
        read_lamost(path)
    assert str(path) in str(info.value)


def test_non_fits_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.fits"
    path.write_text("teff,logg\n5000,4.5\n" * 200)
    with pytest.raises(FitsFormatError, match="not a FITS file"):
        read_lamost(path)
    gz = tmp_path / "notes.fits.gz"
    gz.write_bytes(gzip.compress(b"plain text, gzipped" * 300))
    with pytest.raises(FitsFormatError, match="not a FITS file"):
        read_lamost(gz)


@pytest.mark.shared
@pytest.mark.parametrize("name", [DR10_FILE, DR1_FILE, DR2_FILE])
@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.5, 0.97])
def test_truncated_copy(lamost_dir: Path, tmp_path: Path, name: str, fraction: float) -> None:
    raw = (lamost_dir / name).read_bytes()
    path = tmp_path / "cut.fits"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(FitsFormatError, match="truncated"):
        read_lamost(path)


@pytest.mark.shared
def test_truncated_gzip(lamost_dir: Path, tmp_path: Path) -> None:
    raw = (lamost_dir / DR8_FILE).read_bytes()
    path = tmp_path / "cut.fits.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FitsFormatError, match="truncated"):
        read_lamost(path)
    # a complete gzip stream of a truncated FITS file
    inner = gzip.decompress(raw)
    path.write_bytes(gzip.compress(inner[: 2880 * 16]))
    with pytest.raises(FitsFormatError, match="truncated"):
        read_lamost(path)


def test_unrelated_image(tmp_path: Path) -> None:
    path = tmp_path / "image.fits"
    rng = np.random.default_rng(1)
    fits.PrimaryHDU(rng.normal(size=(64, 64)).astype(np.float32)).writeto(path)
    with pytest.raises(FitsFormatError, match="no recognisable LAMOST"):
        read_lamost(path)
    # 5 rows but nothing about it is a LAMOST spectrum (no wavelength row, no COEFF0/COEFF1)
    fits.PrimaryHDU(rng.normal(size=(5, 300))).writeto(path, overwrite=True)
    with pytest.raises(FitsFormatError, match="no recognisable LAMOST"):
        read_lamost(path)


def test_unrelated_table(tmp_path: Path) -> None:
    path = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="TEFF", format="E", array=np.ones(3))])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(FitsFormatError, match="no recognisable LAMOST"):
        read_lamost(path)


# ------------------------------------------------------------------------------- synthetic layouts


def _image_file(path: Path, rows: np.ndarray, cards: dict[str, object], in_extension: bool = False) -> Path:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    if in_extension:
        fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(rows)]).writeto(path)
    else:
        fits.PrimaryHDU(rows, header).writeto(path)
    return path


def _rows(n: int = 400, wavelength: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(7)
    wave = wavelength if wavelength is not None else 10 ** (3.5682 + 1e-4 * np.arange(n))
    return np.vstack([1000 + rng.normal(size=n), np.full(n, 0.01), wave, np.zeros(n), np.zeros(n)]).astype(
        np.float32
    )


def _table_file(path: Path, lengths: dict[str, int], primary_cards: dict[str, object]) -> Path:
    columns = []
    for name in ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK"):
        n = lengths.get(name, 300)
        value = 10 ** (3.5682 + 1e-4 * np.arange(n)) if name == "WAVELENGTH" else np.ones(n)
        columns.append(fits.Column(name=name, format=f"{n}E", array=value[None, :].astype(np.float32)))
    table = fits.BinTableHDU.from_columns(columns, name="COADD")
    header = fits.Header()
    for key, value in primary_cards.items():
        header[key] = value
    fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(path)
    return path


def test_table_layout_synthetic_with_stale_naxis(tmp_path: Path) -> None:
    path = _table_file(tmp_path / "t.fits", {}, {"OBSID": 42, "DATA_V": "LAMOST DR11 v1.0", "SNRG": 12.5})
    spec = read_lamost(path)
    assert spec.meta["layout"] == "dr9_table"
    assert spec.meta["obsid"] == 42 and spec.meta["data_release"] == "DR11"
    assert spec.meta["snr_g"] == 12.5 and spec.meta["snr_r"] is None
    assert len(spec) == 300


def test_inconsistent_table_lengths(tmp_path: Path) -> None:
    path = _table_file(tmp_path / "t.fits", {"IVAR": 299}, {})
    with pytest.raises(FitsFormatError, match="inconsistent length"):
        read_lamost(path)


def test_wavelength_not_increasing(tmp_path: Path) -> None:
    rows = _rows()
    rows[2] = rows[2][::-1]
    path = _image_file(tmp_path / "rev.fits", rows, {"EXTEN0": "Flux, Inverse, Wavelength, Andmask, Ormask"})
    with pytest.raises(FitsFormatError, match="not increasing"):
        read_lamost(path)
    path = _table_file(tmp_path / "t.fits", {}, {})
    with fits.open(path, mode="update") as hdul:
        hdul[1].data["WAVELENGTH"][0][10] = 1.0
    with pytest.raises(FitsFormatError, match="not increasing"):
        read_lamost(path)


def test_layout_detected_from_content_without_exten0(tmp_path: Path) -> None:
    spec = read_lamost(_image_file(tmp_path / "img.fits", _rows(), {"SNRG": 30.0}))
    assert spec.meta["layout"] == "image_5xN"
    rows = _rows()
    rows[2] = 1.0  # subcontinuum-like row; wavelength must come from the coefficients
    spec = read_lamost(_image_file(tmp_path / "dr1.fits", rows, {"COEFF0": 3.6, "COEFF1": 1e-4}))
    assert spec.meta["layout"] == "dr1_subcontinuum"
    np.testing.assert_allclose(spec.wavelength, 10 ** (3.6 + 1e-4 * np.arange(400)), rtol=1e-12)


def test_dr1_without_wavelength_solution(tmp_path: Path) -> None:
    rows = _rows()
    rows[2] = 1.0
    path = _image_file(tmp_path / "dr1.fits", rows, {"EXTEN0": "Flux Inverse Subcontinuum Andmask Ormask"})
    with pytest.raises(FitsFormatError, match="COEFF0/COEFF1"):
        read_lamost(path)


def test_image_in_hdu1_when_primary_is_empty(tmp_path: Path) -> None:
    cards = {"OBSID": 7, "EXTEN0": "Flux, Inverse, Wavelength, Andmask, Ormask", "SUBCLASS": "K1"}
    spec = read_lamost(_image_file(tmp_path / "ext.fits", _rows(), cards, in_extension=True))
    assert spec.meta["layout"] == "image_5xN"
    assert spec.meta["obsid"] == 7 and spec.meta["subclass"] == "K1"
    assert len(spec) == 400


def test_non_finite_pixels_are_masked(tmp_path: Path) -> None:
    rows = _rows()
    rows[0, 5] = np.nan
    rows[0, 6] = np.inf
    rows[1, 7] = np.nan
    rows[1, 8] = -1.0
    spec = read_lamost(_image_file(tmp_path / "nan.fits", rows, {}))
    assert spec.flux[5] == 0 and spec.flux[6] == 0
    assert np.all(spec.ivar[5:9] == 0)
    assert spec.flux[7] == pytest.approx(rows[0, 7])
    assert np.all(spec.ivar[9:] > 0)
    assert np.all(np.isfinite(spec.flux))


def test_scaled_image_uses_astropy_path(tmp_path: Path) -> None:
    rows = _rows()
    hdu = fits.PrimaryHDU(rows.astype(np.float64))
    hdu.scale("int32", bscale=0.001, bzero=0.0)
    path = tmp_path / "scaled.fits"
    hdu.writeto(path)
    spec = read_lamost(path)
    np.testing.assert_allclose(spec.wavelength, rows[2], atol=1e-3)


# ------------------------------------------------------------------------------------- iter_fits_files


def test_iter_fits_files(tmp_path: Path) -> None:
    names = ["b.fits", "a.fits.gz", "sub/c.fit", "sub/deep/d.FITS", "e.fits.bz2", "notes.txt", "x.fits.tmp"]
    hidden = [".hidden.fits", ".cache/f.fits", "sub/.g.fits.gz"]
    for name in names + hidden:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = iter_fits_files(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == sorted(["a.fits.gz", "b.fits", "e.fits.bz2", "sub/c.fit", "sub/deep/d.FITS"])
    assert found == sorted(found)
    assert [p.name for p in iter_fits_files(tmp_path, pattern="[ab]*")] == ["a.fits.gz", "b.fits"]
    with pytest.raises(NotADirectoryError):
        iter_fits_files(tmp_path / "b.fits")


@pytest.mark.shared
def test_iter_fits_files_on_real_folders(lamost_dir: Path) -> None:
    files = iter_fits_files(lamost_dir)
    # dr10-lasp/fits holds 1176 more (the real label-transfer set)
    assert len(files) == sum(FOLDERS.values()) + len(iter_fits_files(lamost_dir / "dr10-lasp"))
    assert len(iter_fits_files(lamost_dir / "dr10-lasp")) == 1176
    assert all(p.suffix in {".fits", ".gz"} for p in files)
    assert len(iter_fits_files(lamost_dir, pattern="spec-55862-*")) == 20
