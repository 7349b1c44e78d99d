"""Survey catalogue conventions (APOGEE, GALAH, LAMOST LASP / DD-Payne), value cleaning and ``y_err``.

The CSV fragments below are written by hand in the shape of each survey's catalogue (column names,
case, sentinels, flags); no file is downloaded.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from specabund.catalog import CatalogRules, read_catalog
from specabund.config import load_config
from specabund.dataset import Dataset, load_dataset, save_dataset
from specabund.elements import label_kind, label_range, normalize_label
from specabund.errors import ConfigError

# APOGEE DR17 allStar: upper case, <X>_FE_ERR / <X>_FE_FLAG, ASPCAPFLAG bitmask (bit 23 = STAR_BAD),
# -9999 for no measurement. Row 3 is STAR_BAD; row 2 has MG_FE_FLAG set.
APOGEE = """APOGEE_ID,spec,TEFF,TEFF_ERR,LOGG,LOGG_ERR,M_H,M_H_ERR,ALPHA_M,ALPHA_M_ERR,FE_H,FE_H_ERR,\
MG_FE,MG_FE_ERR,MG_FE_FLAG,C_FE,C_FE_ERR,C_FE_FLAG,TIII_FE,ASPCAPFLAG,VHELIO_AVG
2M00000002+7417074,a.fits,4800.5,80.1,2.51,0.05,-0.21,0.01,0.05,0.01,-0.20,0.01,0.12,0.02,0,0.05,0.03,0,0.1,0,-21.3
2M00000019-1924498,b.fits,5200.0,90.0,4.40,0.06,0.10,0.01,-0.01,0.01,0.11,0.01,0.30,0.05,16,-9999,-9999,0,0.2,\
256,12.0
2M00000032+5737103,c.fits,6100.0,120.0,4.10,0.07,-0.60,0.02,0.20,0.02,-0.62,0.02,0.25,0.04,0,0.15,0.05,0,0.3,\
8388608,5.5
2M00000035-7323394,d.fits,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,0,-9999,\
-9999,0,-9999,0,
"""

# GALAH DR3 (mixed case) / DR4 (lower case): e_<label>, flag_<label> (0 = good), flag_sp, nr_<label>
# (number of lines, not a label). Row 2 has flag_mg_fe = 1; row 3 has flag_sp = 1.
GALAH = """sobject_id,spec,teff,e_teff,logg,e_logg,fe_h,e_fe_h,flag_fe_h,flag_sp,Mg_fe,e_Mg_fe,flag_Mg_fe,\
nr_Mg_fe,Ti2_fe,e_Ti2_fe,flag_Ti2_fe,alpha_fe,e_alpha_fe,flag_alpha_fe
131116000501001,a,5770,85,4.40,0.12,0.02,0.07,0,0,0.03,0.05,0,3,0.05,0.1,0,0.02,0.03,0
131116000501002,b,4700,90,2.60,0.15,-0.40,0.08,0,0,0.20,0.06,1,2,0.15,0.1,0,0.18,0.04,0
131116000501003,c,6200,110,4.10,0.20,-0.90,0.09,0,1,0.35,0.08,0,1,0.30,0.2,0,0.30,0.05,0
131116000501004,d,5100,,3.80,,0.10,,0,0,,,32,0,,,0,0.01,,0
"""

# LAMOST LASP (and DD-Payne): teff, logg, feh, alpha_m with *_err; -9999 / -999 for failed fits.
LASP = """obsid,spec,teff,teff_err,logg,logg_err,feh,feh_err,alpha_m,alpha_m_err,rv,rv_err,snrg
906003,906003,5456.41,166.07,3.635,0.749,-0.54,0.431,0.12,0.05,-21.4,13.98,71.4
906009,906009,6672.11,133.34,4.241,0.363,-0.159,0.294,-999,-999,9999,-9999,70.6
906011,906011,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,-9999,12.0
906012,906012,99999,10,4.1,-0.1,-0.3,0.1,0.05,0.02,35.0,5.0,40.2
"""


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _nan(a: float) -> bool:
    return bool(np.isnan(a))


def test_apogee_allstar_columns(tmp_path: Path) -> None:
    cat = read_catalog(_csv(tmp_path, "allstar.csv", APOGEE))
    # abundance-like columns are the labels; TEFF, LOGG, FE_H are auxiliary
    assert cat.elements == ["M_H", "ALPHA_M", "MG_FE", "C_FE", "TIII_FE"]
    assert cat.label_names == ["M_H", "ALPHA_M", "MG_FE", "C_FE", "TIII_FE", "TEFF", "LOGG", "FE_H"]
    assert cat.columns["MG_FE"] == {"value": "MG_FE", "flag": "MG_FE_FLAG", "error": "MG_FE_ERR"}
    assert "VHELIO_AVG" not in cat.table and "rv" not in cat.table  # only a column named rv is a velocity
    names = cat.label_names
    y, e = cat.labels(names), cat.label_errors(names)
    j = {n: i for i, n in enumerate(names)}
    assert y[0, j["MG_FE"]] == pytest.approx(0.12) and e[0, j["MG_FE"]] == pytest.approx(0.02)
    assert e[0, j["TEFF"]] == pytest.approx(80.1)
    # row 1: MG_FE_FLAG = 16 masks MG_FE only; C_FE = -9999 is a sentinel; ASPCAPFLAG 256 is not STAR_BAD
    assert _nan(y[1, j["MG_FE"]]) and _nan(e[1, j["MG_FE"]])
    assert _nan(y[1, j["C_FE"]]) and _nan(e[1, j["C_FE"]])
    assert y[1, j["TEFF"]] == 5200 and y[1, j["ALPHA_M"]] == pytest.approx(-0.01)
    # row 2: ASPCAPFLAG has bit 23 (STAR_BAD): every label of the star is masked
    assert np.isnan(y[2]).all() and np.isnan(e[2]).all()
    # row 3: -9999 everywhere
    assert np.isnan(y[3]).all()
    assert cat.masked["MG_FE"] == {"non_numeric": 0, "sentinel": 1, "implausible": 0, "flag": 2}
    assert cat.masked["C_FE"]["sentinel"] == 2 and cat.masked["C_FE_err"]["sentinel"] == 2
    assert cat.masked["TEFF"]["flag"] == 1


def test_galah_columns(tmp_path: Path) -> None:
    cat = read_catalog(_csv(tmp_path, "galah_dr3.csv", GALAH))
    assert cat.elements == ["MG_FE", "TI2_FE", "ALPHA_FE"]  # e_*, flag_*, nr_* are not labels
    assert cat.columns["MG_FE"] == {"value": "Mg_fe", "flag": "flag_Mg_fe", "error": "e_Mg_fe"}
    assert cat.columns["FE_H"] == {"value": "fe_h", "flag": "flag_fe_h", "error": "e_fe_h"}
    names = cat.label_names
    j = {n: i for i, n in enumerate(names)}
    y, e = cat.labels(names), cat.label_errors(names)
    assert e[0, j["TEFF"]] == 85 and e[0, j["MG_FE"]] == pytest.approx(0.05)
    assert _nan(y[1, j["MG_FE"]]) and y[1, j["TI2_FE"]] == pytest.approx(0.15)  # flag_Mg_fe masks Mg only
    assert np.isnan(y[2]).all()  # flag_sp != 0 masks the whole star
    assert y[3, j["TEFF"]] == 5100 and _nan(e[3, j["TEFF"]])  # error unknown: NaN
    assert cat.masked["MG_FE"]["flag"] == 2 and cat.masked["TEFF"]["flag"] == 1
    # DR4 spells everything in lower case: same result
    dr4 = read_catalog(_csv(tmp_path, "galah_dr4.csv", GALAH.lower()))
    assert dr4.elements == cat.elements
    np.testing.assert_array_equal(dr4.labels(names), y)
    np.testing.assert_array_equal(dr4.label_errors(names), e)


def test_lasp_dd_payne_columns(tmp_path: Path) -> None:
    cat = read_catalog(_csv(tmp_path, "lasp.csv", LASP))
    assert cat.elements == ["ALPHA_M"]
    assert cat.columns["FE_H"] == {"value": "feh", "error": "feh_err"}
    t = cat.table
    assert t["teff"].iloc[0] == pytest.approx(5456.41) and _nan(t["teff"].iloc[2])
    assert _nan(t["teff"].iloc[3])  # 99999 K is implausible
    assert _nan(t["ALPHA_M"].iloc[1])  # -999
    assert t["rv"].iloc[0] == pytest.approx(-21.4)
    assert _nan(t["rv"].iloc[1]) and _nan(t["rv"].iloc[2])  # 9999 km/s implausible, -9999 sentinel
    e = cat.label_errors(["TEFF", "LOGG", "FE_H", "ALPHA_M"])
    assert e[0, 0] == pytest.approx(166.07)
    assert _nan(e[3, 1])  # a negative error is implausible
    assert cat.masked["TEFF"] == {"non_numeric": 0, "sentinel": 1, "implausible": 1, "flag": 0}
    assert cat.masked["LOGG_err"]["implausible"] == 1
    assert cat.masked["rv"] == {"non_numeric": 0, "sentinel": 1, "implausible": 1, "flag": 0}
    # any label the catalogue carries, in the order asked
    chosen = read_catalog(tmp_path / "lasp.csv", ["TEFF", "logg", "[Fe/H]", "alpha_m"])
    assert chosen.elements == ["TEFF", "LOGG", "FE_H", "ALPHA_M"]
    assert chosen.label_names == ["TEFF", "LOGG", "FE_H", "ALPHA_M"]


def test_parameters_only_catalogue_learns_parameters(tmp_path: Path) -> None:
    p = _csv(tmp_path, "lasp_labels.csv", "spec,obsid,designation,subclass,snrg,teff,logg,fe_h\n"
             "a.fits.gz,1,J1,G3,13.1,5614.7,4.45,-0.77\n")  # fmt: skip
    cat = read_catalog(p)
    assert cat.elements == ["TEFF", "LOGG", "FE_H"] and cat.label_names == ["TEFF", "LOGG", "FE_H"]


def test_flag_policy_keep_and_non_numeric(tmp_path: Path) -> None:
    p = _csv(tmp_path, "allstar.csv", APOGEE)
    kept = read_catalog(p, rules=CatalogRules(flag_policy="keep"))
    y = kept.labels(["MG_FE", "TEFF"])
    assert y[1, 0] == pytest.approx(0.30) and y[2, 1] == 6100  # flagged values kept
    assert kept.masked["MG_FE"]["flag"] == 0 and kept.masked["MG_FE"]["flag_kept"] == 2
    text = _csv(tmp_path, "text.csv", "spec,MG_FE,teff\na,0.1,5000\nb,n.d.,5100\nc,,5200\n")
    cat = read_catalog(text)
    assert cat.masked["MG_FE"]["non_numeric"] == 1 and cat.labels(["MG_FE"])[1, 0] != 0.1


def test_ranges_and_rules_from_config(tmp_path: Path) -> None:
    user = _csv(
        tmp_path, "user.toml", "[data]\nlabel_ranges = { TEFF = [3000.0, 6000.0] }\nsentinels = [-1.0]\n"
    )
    rules = CatalogRules.from_config(load_config(user)["data"])
    assert rules.range_of("TEFF") == (3000.0, 6000.0)
    assert rules.range_of("logg") == (-1.0, 6.0)  # entries not given keep their defaults
    cat = read_catalog(_csv(tmp_path, "lasp.csv", LASP), rules=rules)
    assert _nan(cat.table["teff"].iloc[1])  # 6672 K now outside
    assert cat.table["logg"].iloc[2] == -9999 or _nan(cat.table["logg"].iloc[2])
    assert cat.masked["LOGG"]["sentinel"] == 0  # -9999 is no sentinel any more, but implausible
    assert cat.masked["LOGG"]["implausible"] == 1
    with pytest.raises(ConfigError, match=r"data.flag_policy = 'drop'; allowed values: mask, keep"):
        load_config(overrides={"data.flag_policy": "drop"})
    with pytest.raises(ConfigError, match=r"data.label_ranges.TEFF = \[6000.0, 3000.0\]"):
        CatalogRules(label_ranges={"TEFF": [6000.0, 3000.0]})
    with pytest.raises(ConfigError, match="max_abs_rv_kms"):
        load_config(overrides={"data.max_abs_rv_kms": -5.0})


def test_label_names_and_kinds() -> None:
    assert normalize_label("m_h") == "M_H" and normalize_label("[M/H]") == "M_H"
    assert normalize_label("[alpha/M]") == "ALPHA_M" and normalize_label("Alpha_Fe") == "ALPHA_FE"
    assert normalize_label("feh") == "FE_H"
    assert label_kind("teff") == "parameter" and label_kind("[Fe/H]") == "parameter"
    for lab in ("MG_FE", "TiII_fe", "mg_h", "M_H", "alpha_m", "XX_FE"):
        assert label_kind(lab) == "abundance", lab
    for col in ("e_mg_fe", "flag_mg_fe", "MG_FE_ERR", "nr_Mg_fe", "ra_h", "VMIC", "C_FE_SPEC"):
        assert label_kind(col) is None, col
    assert label_range("MG_FE") == (-3.0, 4.0) and label_range("MG_H") == (-5.0, 2.0)
    assert label_range("VMIC") is None


def test_readme_example_parses_as_before(tmp_path: Path) -> None:
    p = _csv(
        tmp_path,
        "X_FE.csv",
        "spec,teff,logg,fe_h,C_FE,MG_FE,CA_FE,rv,group\n"
        "spec-55862-B6212_sp06-003.fits,4850,2.41,-0.32,0.05,0.21,0.12,,\n"
        "spec-57287-HD231915N195622B01_sp01-001.fits.gz,5790,4.32,0.05,,0.02,0.01,-23.4,\n"
        "3703110,6120,4.10,-0.61,0.10,0.25,,,star-17\n",
    )
    cat = read_catalog(p)
    assert cat.elements == ["C_FE", "MG_FE", "CA_FE"]
    assert cat.label_names == ["C_FE", "MG_FE", "CA_FE", "TEFF", "LOGG", "FE_H"]
    assert list(cat.table.columns) == [
        "spec",
        "teff",
        "logg",
        "fe_h",
        "C_FE",
        "MG_FE",
        "CA_FE",
        "rv",
        "group",
    ]
    expected = np.array(
        [[0.05, 0.21, 0.12, 4850, 2.41, -0.32], [np.nan, 0.02, 0.01, 5790, 4.32, 0.05],
         [0.10, 0.25, np.nan, 6120, 4.10, -0.61]]
    )  # fmt: skip
    np.testing.assert_array_equal(cat.labels(cat.label_names), expected)
    assert np.isnan(cat.label_errors(cat.label_names)).all()
    assert cat.table["rv"].iloc[1] == -23.4 and cat.table["group"].iloc[2] == "star-17"
    assert cat.masked_total() == 0


# ----------------------------------------------------------------------------------------- dataset y_err


def _tiny(n: int = 4, labels: tuple[str, ...] = ("TEFF", "MG_FE")) -> Dataset:
    rng = np.random.default_rng(0)
    s = np.array([f"s{i}" for i in range(n)])
    nan = np.full(n, np.nan, dtype=np.float32)
    return Dataset(
        X=rng.normal(size=(n, 5)).astype(np.float32),
        ivar=np.ones((n, 5), np.float32),
        wavelength=np.linspace(4000, 5000, 5),
        y=rng.normal(size=(n, len(labels))).astype(np.float32),
        elements=list(labels),
        filenames=s,
        obsid=s,
        spec=s,
        teff=nan,
        logg=nan,
        fe_h=nan,
        snr=nan,
        split=np.zeros(n, np.int8),
        group=s,
    )


def test_dataset_y_err_roundtrip_and_old_files(tmp_path: Path) -> None:
    ds = _tiny()
    assert ds.y_err.shape == ds.y.shape and np.isnan(ds.y_err).all()  # unknown by default
    err = np.arange(8, dtype=np.float32).reshape(4, 2)
    ds = replace(ds, y_err=err)
    save_dataset(tmp_path / "d.npz", ds)
    back = load_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(back.y_err, err)
    np.testing.assert_array_equal(back.subset(np.array([2, 0])).y_err, err[[2, 0]])
    np.testing.assert_array_equal(Dataset.concatenate([back, back]).y_err, np.vstack([err, err]))
    assert np.isnan(replace(back, y=back.y[:, :1], elements=["TEFF"]).y_err).all()  # other labels: unknown
    # a dataset written before y_err existed
    with np.load(tmp_path / "d.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "y_err"}
    np.savez(tmp_path / "old.npz", **arrays)
    old = load_dataset(tmp_path / "old.npz")
    assert old.y_err.shape == (4, 2) and np.isnan(old.y_err).all()


def test_ambiguous_or_unusable_columns_are_errors(tmp_path: Path) -> None:
    from specabund.errors import CatalogError

    both = _csv(tmp_path, "both.csv", "spec,MG_FE,[Mg/Fe]\na,0.1,0.2\n")
    with pytest.raises(CatalogError, match=r"columns 'MG_FE' and '\[Mg/Fe\]' are both the label MG_FE"):
        read_catalog(both)
    # a whole column of sentinels or out-of-range numbers is a units/convention problem, not data
    units = _csv(tmp_path, "units.csv", "spec,MG_FE,teff\na,0.1,3.71\nb,0.2,3.76\n")  # log10 Teff
    with pytest.raises(CatalogError, match=r"column 'teff' \(label TEFF\) has no usable value: 0 sentinel"):
        read_catalog(units)
    ms = _csv(tmp_path, "ms.csv", "spec,MG_FE,rv\na,0.1,-21400\nb,0.2,35000\n")  # rv in m/s
    with pytest.raises(CatalogError, match=r"column 'rv' \(rv \(km/s\)\) has no usable value"):
        read_catalog(ms, require_labels=False)
    # single bad values, all-sentinel rv and text are masked, not errors
    ok = _csv(tmp_path, "ok.csv", "spec,MG_FE,rv\na,0.1,-9999\nb,high,fast\n")
    assert read_catalog(ok).masked["rv"] == {"non_numeric": 1, "sentinel": 1, "implausible": 0, "flag": 0}
