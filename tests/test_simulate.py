"""Tests of the LAMOST spectrum simulator (specabund.simulate)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from specabund.lines import air_to_vacuum, load_linelist, vacuum_to_air
from specabund.simulate import (
    ABUNDANCE_ELEMENTS,
    INDEPENDENT_RANGES,
    LABEL_COLUMNS,
    MASK_BITS,
    draw_labels,
    lamost_wavelength_grid,
    normalized_model_flux,
    simulate_dataset,
    simulate_spectrum,
    write_lamost_fits,
)

SUN = {"teff": 5777.0, "logg": 4.44, "fe_h": 0.0}
GRID = lamost_wavelength_grid()


def ew(flux: np.ndarray, wave: np.ndarray, lo: float, hi: float) -> float:
    """Equivalent width (A) of the normalised flux between lo and hi."""
    sel = (wave >= lo) & (wave <= hi)
    return float(np.trapezoid(1.0 - flux[sel], wave[sel]))


def with_(base: dict[str, float], **kw: float) -> dict[str, float]:
    out = dict(base)
    out.update(kw)
    return out


# ------------------------------------------------------------------------------------------ line list


def test_linelist_columns_and_vacuum_wavelengths() -> None:
    ll = load_linelist()
    for col in ("species", "element", "wavelength", "kind", "source", "loggf", "chi_ev"):
        assert col in ll.columns
    assert set(ll["kind"]) == {"atomic", "molecular_band"}
    assert ll["wavelength"].is_monotonic_increasing
    assert ll["source"].str.len().min() > 5
    # every vacuum wavelength is the documented conversion of the tabulated air wavelength
    np.testing.assert_allclose(ll["wavelength"], air_to_vacuum(ll["wavelength_air"].to_numpy()), atol=2e-3)
    # sodium must survive pandas' NA parsing
    assert (ll["element"] == "NA").sum() >= 4
    known = {  # species: vacuum wavelengths (A) of famous features
        "Mg I": [5168.8, 5174.1, 5185.0],
        "Ca II": [3934.8, 3969.6, 8500.4, 8544.4, 8664.5],
        "Na I": [5891.6, 5897.6],
        "H I": [6564.6, 4862.7],
        "Ba II": [4555.3, 4935.5, 6143.4, 6498.7],
        "O I": [7774.1, 7776.3, 7777.5],
        "CH": [4315.4],
        "C2": [5166.6],
    }
    for species, waves in known.items():
        got = ll.loc[ll["species"] == species, "wavelength"].to_numpy()
        for w in waves:
            assert np.min(np.abs(got - w)) < 0.3, (species, w)
    assert set(load_linelist(elements=["mg"])["element"]) == {"MG"}
    assert (load_linelist(kind="molecular_band")["kind"] == "molecular_band").all()


def test_air_vacuum_round_trip() -> None:
    w = np.linspace(3600.0, 9500.0, 50)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(w)), w, atol=2e-3)
    assert air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.01)  # H-alpha


# ------------------------------------------------------------------------------------------ model physics


def test_element_lines_respond_only_to_their_element() -> None:
    base = normalized_model_flux(SUN, GRID)
    mg = normalized_model_flux(with_(SUN, MG_FE=0.2), GRID)
    ca = normalized_model_flux(with_(SUN, CA_FE=0.2), GRID)
    mgb = (5160.0, 5192.0)
    hk = (3925.0, 3945.0)
    assert ew(mg, GRID, *mgb) > ew(base, GRID, *mgb) + 0.05
    assert ew(mg, GRID, *hk) == pytest.approx(ew(base, GRID, *hk), abs=1e-9)
    assert ew(ca, GRID, *hk) > ew(base, GRID, *hk) + 0.05
    assert ew(ca, GRID, *mgb) == pytest.approx(ew(base, GRID, *mgb), abs=1e-9)
    # Ca infrared triplet responds to Ca, the O triplet to O, Ba 6498 to Ba, Na D to Na
    assert ew(ca, GRID, 8490, 8680) > ew(base, GRID, 8490, 8680)
    for key, lo, hi in (
        ("O_FE", 7768, 7784),
        ("BA_FE", 6494, 6504),
        ("NA_FE", 5885, 5903),
        ("MN_FE", 4029, 4040),
    ):
        up = normalized_model_flux(with_(SUN, **{key: 0.3}), GRID)
        assert ew(up, GRID, lo, hi) > ew(base, GRID, lo, hi), key


def test_carbon_changes_g_band_and_molecules() -> None:
    giant = {"teff": 4600.0, "logg": 2.4, "fe_h": -0.3}
    lo, hi = 4290.0, 4320.0
    w = [ew(normalized_model_flux(with_(giant, C_FE=c), GRID), GRID, lo, hi) for c in (-0.3, 0.0, 0.3)]
    assert w[0] < w[1] < w[2]
    assert w[2] - w[0] > 0.3
    # CN 3883 band responds to N
    cn = [ew(normalized_model_flux(with_(giant, N_FE=n), GRID), GRID, 3845, 3884) for n in (0.0, 0.5)]
    assert cn[1] > cn[0]


def test_balmer_trends() -> None:
    def hbeta(teff: float, logg: float) -> float:
        return ew(normalized_model_flux({"teff": teff, "logg": logg, "fe_h": -1.0}, GRID), GRID, 4830, 4895)

    temps = [4500.0, 5500.0, 6500.0, 7500.0]
    widths = [hbeta(t, 4.2) for t in temps]
    assert np.all(np.diff(widths) > 0)  # stronger towards hotter stars in the FGK range
    peak = [hbeta(t, 4.0) for t in (6500.0, 9500.0, 15000.0)]
    assert peak[1] > peak[0] and peak[1] > peak[2]  # Balmer maximum near A0
    # pressure broadening: at fixed Teff higher gravity gives broader wings (less flux 10-25 A from centre)
    hi_g = normalized_model_flux({"teff": 8000.0, "logg": 4.5, "fe_h": -1.0}, GRID)
    lo_g = normalized_model_flux({"teff": 8000.0, "logg": 2.5, "fe_h": -1.0}, GRID)
    wing = (np.abs(GRID - 4862.7) > 10) & (np.abs(GRID - 4862.7) < 25)
    assert hi_g[wing].mean() < lo_g[wing].mean() - 0.01


def test_temperature_and_gravity_dependences() -> None:
    # neutral metal lines stronger in cool stars
    hot = normalized_model_flux({"teff": 6500.0, "logg": 4.4, "fe_h": 0.0}, GRID)
    cool = normalized_model_flux({"teff": 4800.0, "logg": 4.4, "fe_h": 0.0}, GRID)
    assert ew(cool, GRID, 6250, 6258) > ew(hot, GRID, 6250, 6258) * 1.3  # Fe I 6254
    # metallicity deepens metal lines
    poor = normalized_model_flux({"teff": 5777.0, "logg": 4.44, "fe_h": -1.0}, GRID)
    base = normalized_model_flux(SUN, GRID)
    assert ew(poor, GRID, 5260, 5340) < 0.5 * ew(base, GRID, 5260, 5340)
    # gravity-sensitive Mg b: stronger in the dwarf than in the giant at the same Teff
    dwarf = normalized_model_flux({"teff": 4800.0, "logg": 4.6, "fe_h": 0.0}, GRID)
    giant = normalized_model_flux({"teff": 4800.0, "logg": 2.0, "fe_h": 0.0}, GRID)
    assert ew(dwarf, GRID, 5160, 5192) > ew(giant, GRID, 5160, 5192)


def test_continuum_is_one_away_from_lines() -> None:
    for lab in (SUN, {"teff": 4500.0, "logg": 2.0, "fe_h": 0.2}, {"teff": 6800.0, "logg": 4.0, "fe_h": -2.0}):
        f = normalized_model_flux(lab, GRID)
        assert np.all(f <= 1.0) and np.all(f > 0.0)
        assert f.max() > 0.999
        for lo, hi in ((6030.0, 6090.0), (6900.0, 7000.0), (8900.0, 9000.0)):
            sel = (GRID > lo) & (GRID < hi)
            assert np.percentile(f[sel], 90) > 0.995, (lab, lo)


def test_instrumental_resolution() -> None:
    # an isolated weak line (Ni I 7122 air) in a metal-poor star, on a fine grid
    lab = {"teff": 5800.0, "logg": 4.4, "fe_h": -1.5}
    centre = air_to_vacuum(7122.20)
    wave = np.linspace(centre - 15.0, centre + 15.0, 3001)
    for resolution in (1800.0, 3600.0):
        depth = 1.0 - normalized_model_flux(lab, wave, resolution=resolution)
        assert 0.005 < depth.max() < 0.2  # weak
        above = wave[depth >= 0.5 * depth.max()]
        fwhm = above[-1] - above[0]
        assert fwhm == pytest.approx(centre / resolution, rel=0.08)


def test_model_is_smooth_in_labels() -> None:
    # finite differences with two step sizes agree: the model is differentiable (used for Cramer-Rao bounds)
    for key, h in (("MG_FE", 0.01), ("teff", 10.0), ("logg", 0.01), ("C_FE", 0.01)):

        def deriv(step: float, key: str = key) -> np.ndarray:
            up = normalized_model_flux(with_(SUN, **{key: SUN.get(key, 0.0) + step}), GRID)
            dn = normalized_model_flux(with_(SUN, **{key: SUN.get(key, 0.0) - step}), GRID)
            return (up - dn) / (2 * step)

        d1, d2 = deriv(h), deriv(h / 10)
        assert np.abs(d1).max() > 0
        np.testing.assert_allclose(d1, d2, atol=2e-3 * np.abs(d1).max())


def test_missing_abundances_default_to_solar_ratio() -> None:
    full = {**SUN, **{f"{e}_FE": 0.0 for e in ABUNDANCE_ELEMENTS}}
    np.testing.assert_array_equal(normalized_model_flux(full, GRID), normalized_model_flux(SUN, GRID))
    upper = {"TEFF": 5777.0, "LOGG": 4.44, "FE_H": 0.0}
    np.testing.assert_array_equal(normalized_model_flux(upper, GRID), normalized_model_flux(SUN, GRID))
    with pytest.raises(ValueError):
        normalized_model_flux(SUN, GRID[::-1])


# ------------------------------------------------------------------------------------------ observed spectra


def test_simulate_spectrum_determinism_and_header_values() -> None:
    a = simulate_spectrum(SUN, np.random.default_rng(5), snr_g=40.0, rv_kms=25.0)
    b = simulate_spectrum(SUN, np.random.default_rng(5), snr_g=40.0, rv_kms=25.0)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.ivar, b.ivar)
    assert 3850 <= len(a) <= 3909
    logw = np.log10(a.wavelength)
    np.testing.assert_allclose(np.diff(logw), 1e-4, rtol=1e-6)
    assert logw[0] == pytest.approx(a.meta["coeff0"], abs=1e-9)
    assert a.meta["snr_g"] == pytest.approx(40.0, rel=0.05)
    assert a.meta["snr_u"] < a.meta["snr_g"]
    assert a.meta["z"] == pytest.approx(25.0 / 299792.458, abs=5 * a.meta["z_err"])
    assert a.meta["class"] == "STAR" and a.meta["subclass"].startswith("G")
    # every dead pixel carries a mask bit, and the AND mask is a subset of the OR mask
    dead = a.ivar == 0
    assert np.all(a.andmask[dead] != 0)
    assert np.all((a.andmask & ~a.ormask) == 0)


def test_noise_consistent_with_ivar_and_lines_shifted() -> None:
    chi2 = []
    for seed in range(4):
        noisy = simulate_spectrum(SUN, np.random.default_rng(seed), snr_g=30.0, rv_kms=100.0)
        clean = simulate_spectrum(SUN, np.random.default_rng(seed), snr_g=30.0, rv_kms=100.0, noiseless=True)
        good = (noisy.ivar > 0) & ((noisy.ormask & MASK_BITS["BADCCD"]) == 0)
        chi2.append(np.mean((noisy.flux - clean.flux)[good] ** 2 * noisy.ivar[good]))
    assert np.mean(chi2) == pytest.approx(1.0, abs=0.05)
    # the Doppler shift moves H-alpha: minimum of the normalised flux near 6564.61 * (1 + v/c)
    norm = clean.meta["normalization"]
    sel = np.abs(clean.wavelength - 6566.8) < 8
    w_min = clean.wavelength[sel][np.argmin(norm[sel])]
    assert w_min == pytest.approx(6564.61 * (1 + 100.0 / 299792.458), abs=1.6)
    # telluric O2 A band is in the observed spectrum
    a_band = norm[(clean.wavelength > 7597) & (clean.wavelength < 7610)].mean()
    beside = norm[(clean.wavelength > 7540) & (clean.wavelength < 7580)].mean()
    assert a_band < beside - 0.1


# ------------------------------------------------------------------------------------------ labels


def test_galactic_labels() -> None:
    df = draw_labels(6000, np.random.default_rng(0), with_population=True)
    assert list(df.columns[:-1]) == list(LABEL_COLUMNS)
    assert df["teff"].between(3900, 7200).all() and df["logg"].between(0.8, 4.9).all()
    assert df["fe_h"].between(-2.5, 0.5).all()
    dwarfs = df[df["logg"] > 4.0]
    giants = df[(df["logg"] < 3.5) & (df["teff"] < 5300)]
    assert len(dwarfs) > 1000 and len(giants) > 1000
    # the knee: high-alpha stars at low [Fe/H] have higher [Mg/Fe] than the thin disc near solar [Fe/H]
    poor = df[(df["fe_h"] < -1.0) & (df["population"] != "thin")]
    solar = df[(df["fe_h"] > -0.2) & (df["population"] == "thin")]
    assert poor["MG_FE"].mean() > 0.25 and abs(solar["MG_FE"].mean()) < 0.08
    mid = df[df["fe_h"].between(-0.7, -0.3)]
    assert (
        mid.loc[mid["population"] == "thick", "MG_FE"].mean()
        > mid.loc[mid["population"] == "thin", "MG_FE"].mean() + 0.1
    )
    # carbon depleted on the upper giant branch
    assert df.loc[df["logg"] < 2.0, "C_FE"].mean() < df.loc[df["logg"] > 4.0, "C_FE"].mean() - 0.15


def test_independent_labels() -> None:
    df = draw_labels(4000, np.random.default_rng(1), independent=True, elements=["mg", "ca"])
    assert list(df.columns) == ["teff", "logg", "fe_h", "MG_FE", "CA_FE"]
    for col in df.columns:
        lo, hi = INDEPENDENT_RANGES[col]
        assert df[col].between(lo, hi).all()
    corr = df.corr().to_numpy()
    assert np.abs(corr[~np.eye(len(corr), dtype=bool)]).max() < 0.08


# ------------------------------------------------------------------------------------------ FITS files


@pytest.mark.parametrize(
    ("layout", "gz"), [("table", False), ("image", False), ("table", True), ("image", True)]
)
def test_fits_round_trip(tmp_path: Path, layout: str, gz: bool) -> None:
    spec = simulate_spectrum(SUN, np.random.default_rng(3), snr_g=50.0)
    spec.meta["data_release"] = "DR10" if layout == "table" else "DR8"
    name = f"{spec.meta['obsid']}.fits" if layout == "table" else spec.meta["filename"]
    path = write_lamost_fits(spec, tmp_path / name, layout=layout, gzip=gz)
    assert path.exists() and path.name.endswith(".fits.gz" if gz else ".fits")
    with fits.open(path) as hdul:
        hdul.verify("exception")  # standard-conforming FITS
        h = hdul[0].header
        for key in ("OBSID", "FILENAME", "DESIG", "RA", "DEC", "CLASS", "SUBCLASS", "Z", "Z_ERR", "DATA_V"):
            assert key in h
        for key in ("SNRU", "SNRG", "SNRR", "SNRI", "SNRZ", "COEFF0", "COEFF1", "CRVAL1", "CD1_1"):
            assert key in h
        assert h["CLASS"] == "STAR" and h["OBSID"] == spec.meta["obsid"]
        assert h["COEFF0"] == pytest.approx(np.log10(spec.wavelength[0]), abs=1e-6)
        if layout == "table":
            assert hdul[0].data is None and hdul[1].name == "COADD"
            assert hdul[1].columns.names == [
                "FLUX",
                "IVAR",
                "WAVELENGTH",
                "ANDMASK",
                "ORMASK",
                "NORMALIZATION",
            ]
            row = hdul[1].data[0]
            flux, wave, orm = row["FLUX"], row["WAVELENGTH"], row["ORMASK"]
        else:
            data = hdul[0].data
            assert data.shape == (5, len(spec)) and data.dtype.kind == "f"
            flux, wave, orm = data[0], data[2], data[4]
        np.testing.assert_allclose(flux, spec.flux, rtol=1e-6)
        np.testing.assert_allclose(wave, spec.wavelength, rtol=1e-7)
        np.testing.assert_array_equal(orm.astype(np.int32), spec.ormask)

    from specabund.io import read_lamost  # written concurrently; the round trip must hold once it exists

    back = read_lamost(path)
    np.testing.assert_allclose(back.wavelength, spec.wavelength, rtol=1e-7)
    np.testing.assert_allclose(back.flux, spec.flux, rtol=1e-6)
    np.testing.assert_allclose(back.ivar, spec.ivar, rtol=1e-6)
    np.testing.assert_array_equal(back.andmask, spec.andmask)
    np.testing.assert_array_equal(back.ormask, spec.ormask)
    assert back.meta["obsid"] == spec.meta["obsid"]
    assert back.meta["z"] == pytest.approx(spec.meta["z"], abs=1e-8)
    assert back.meta["snr_g"] == pytest.approx(spec.meta["snr_g"], abs=0.01)
    assert back.meta["class"] == "STAR"


def _digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_simulate_dataset(tmp_path: Path) -> None:
    s1 = simulate_dataset(24, tmp_path / "a", seed=7, layout="mixed", n_workers=1, prediction_fraction=0.3)
    s2 = simulate_dataset(24, tmp_path / "b", seed=7, layout="mixed", n_workers=2, prediction_fraction=0.3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # independent of n_workers, byte for byte
    assert s1["n_spectra"] == s2["n_spectra"] == 24
    assert s1["n_reference"] + s1["n_prediction"] == 24 and s1["n_prediction"] > 0
    assert set(s1["layouts"]) == {"table", "image"}

    ref = pd.read_csv(tmp_path / "a" / "X_FE.csv")
    pred = pd.read_csv(tmp_path / "a" / "galah_X_FE.csv")
    truth = pd.read_csv(tmp_path / "a" / "truth.csv")
    expected = [
        "spec",
        "teff",
        "logg",
        "fe_h",
        *(f"{e}_FE" for e in ABUNDANCE_ELEMENTS),
        "snr",
        "rv",
        "group",
    ]
    assert list(ref.columns) == expected and list(pred.columns) == expected
    assert not set(ref["group"]) & set(pred["group"])  # disjoint stars
    files = {p.name for p in (tmp_path / "a" / "fits").iterdir()}
    assert set(truth["spec"]) == files and len(files) == 24
    for name, lay in zip(truth["spec"], truth["layout"], strict=True):
        assert name.startswith("spec-") == (lay == "image")
    repeats = truth[truth["group_size"] == 2]
    assert len(repeats) >= 2
    for _, grp in repeats.groupby("group"):
        assert grp["teff"].nunique() == 1 and grp["spec"].nunique() == 2
    # a different seed gives different data
    s3 = simulate_dataset(6, tmp_path / "c", seed=8, layout="table", gzip=True)
    assert s3["layouts"] == {"table": 6}
    assert all(n.endswith(".fits.gz") for n in pd.read_csv(tmp_path / "c" / "truth.csv")["spec"])


def test_permuted_abundances_keep_marginals_and_break_correlations(tmp_path: Path) -> None:
    """``permuted=True``: the same Galactic stars, each X_FE column shuffled across them."""
    with pytest.raises(ValueError, match="exclude"):
        simulate_dataset(4, tmp_path / "x", seed=1, independent=True, permuted=True)
    simulate_dataset(60, tmp_path / "g", seed=5, prediction_fraction=0.0, repeat_fraction=0.0)
    s = simulate_dataset(
        60, tmp_path / "p", seed=5, prediction_fraction=0.0, repeat_fraction=0.0, permuted=True
    )
    assert s["permuted"]
    gal = pd.read_csv(tmp_path / "g" / "truth.csv")
    perm = pd.read_csv(tmp_path / "p" / "truth.csv")
    for col in ("teff", "logg", "fe_h"):
        np.testing.assert_array_equal(gal[col], perm[col])
    for col in ("C_FE", "MG_FE", "CA_FE"):
        np.testing.assert_allclose(np.sort(gal[col]), np.sort(perm[col]))
        assert not np.allclose(gal[col], perm[col])
    # the alpha knee ties [Mg/Fe] to [Fe/H] in the Galactic draw, not after the shuffle
    big = draw_labels(3000, np.random.default_rng(3))
    assert np.corrcoef(big["fe_h"], big["MG_FE"])[0, 1] < -0.3
