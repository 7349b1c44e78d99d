"""Configuration, label-name normalisation and label catalogue matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specabund.catalog import match_catalog, read_catalog, spec_key
from specabund.config import default_config, dumps, load_config, read_toml, save_config
from specabund.elements import normalize_label, resolve_labels, split_values
from specabund.errors import CatalogError, ConfigError

# ---------------------------------------------------------------------------------------------- elements


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("c_fe", "C_FE"),
        ("C_FE", "C_FE"),
        ("[Mg/Fe]", "MG_FE"),
        ("Ca/Fe", "CA_FE"),
        ("mg", "MG_FE"),
        ("teff", "TEFF"),
        ("FeH", "FE_H"),
        ("[Fe/H]", "FE_H"),
        ("log_g", "LOGG"),
    ],
)
def test_normalize_label(raw: str, expected: str) -> None:
    assert normalize_label(raw) == expected


def test_resolve_labels_errors_list_valid_choices() -> None:
    assert resolve_labels(["c_fe", "MG_FE", "C_FE"], ["C_FE", "MG_FE"]) == ["C_FE", "MG_FE"]
    assert resolve_labels(None, ["C_FE", "MG_FE"]) == ["C_FE", "MG_FE"]
    with pytest.raises(ConfigError, match=r"'XX_FE'.*unknown element.*C_FE, MG_FE"):
        resolve_labels(["XX_FE"], ["C_FE", "MG_FE"])
    with pytest.raises(ConfigError, match=r"not available.*C_FE, MG_FE"):
        resolve_labels(["CA_FE"], ["C_FE", "MG_FE"])


def test_split_values() -> None:
    assert split_values(["C_FE,MG_FE", "CA_FE"]) == ["C_FE", "MG_FE", "CA_FE"]


# ---------------------------------------------------------------------------------------------- config


def test_default_config_matches_configs_folder() -> None:
    root = Path(__file__).resolve().parents[1]
    assert default_config() == read_toml(root / "configs" / "default.toml")


def test_overlay_order_and_resolved_roundtrip(tmp_path: Path) -> None:
    user = tmp_path / "user.toml"
    user.write_text("[training]\nepochs = 7\nlearning_rate = 0.01\n")
    cfg = load_config(user, {"training.epochs": 3})
    assert cfg["training"]["epochs"] == 3  # flag beats file
    assert cfg["training"]["learning_rate"] == 0.01  # file beats default
    out = save_config(cfg, tmp_path / "resolved.toml")
    assert read_toml(out) == cfg
    assert "epochs = 3" in dumps(cfg)


def test_config_errors_name_key_and_allowed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\ndevice = 'tpu'\n")
    with pytest.raises(ConfigError, match=r"training.device = 'tpu'; allowed values: auto, cpu, cuda"):
        load_config(bad)
    bad.write_text("[trainnig]\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trainnig\]"):
        load_config(bad)
    bad.write_text("[data]\nseeed = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key data.seeed; allowed keys in \[data\]"):
        load_config(bad)
    bad.write_text("[tuning]\nn_trials = 'many'\n")
    with pytest.raises(ConfigError, match=r"tuning.n_trials = 'many' has type str, expected int"):
        load_config(bad)
    bad.write_text("[data]\nsplit_fractions = [0.5, 0.5, 0.5]\n")
    with pytest.raises(ConfigError, match="split_fractions"):
        load_config(bad)
    bad.write_text("[training\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


# ---------------------------------------------------------------------------------------------- catalog


def _fits_dir(tmp_path: Path, names: list[str]) -> tuple[Path, list[Path]]:
    d = tmp_path / "fits"
    files = []
    for n in names:
        p = d / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        files.append(p)
    return d, files


def test_spec_key() -> None:
    assert spec_key("spec-1-a_sp01-001.fits.gz") == "spec-1-a_sp01-001"
    assert spec_key("sub/3703110.fits") == "3703110"
    assert spec_key("3703110") == "3703110"


def test_read_catalog_normalises_columns(tmp_path: Path) -> None:
    csv = tmp_path / "X_FE.csv"
    csv.write_text(
        "SPEC,Teff,logg,[Fe/H],[Mg/Fe],c_fe,rv\na.fits,5000,2.5,-0.5,0.2,,10\nb,5500,4.4,0.0,,0.1,\n"
    )
    cat = read_catalog(csv)
    assert cat.elements == ["MG_FE", "C_FE"]
    assert cat.label_names == ["MG_FE", "C_FE", "TEFF", "LOGG", "FE_H"]
    y = cat.labels(cat.label_names)
    assert np.isnan(y[0, 1]) and np.isnan(y[1, 0])  # missing abundances stay NaN
    assert y[1, 2] == 5500
    assert np.isnan(cat.labels(["CA_FE"])).all()  # an absent column is all NaN, not an error
    assert np.isnan(cat.table["rv"][1])
    assert read_catalog(csv, ["mg"]).elements == ["MG_FE"]


def test_catalog_errors(tmp_path: Path) -> None:
    csv = tmp_path / "nospec.csv"
    csv.write_text("name,C_FE\na,0.1\n")
    with pytest.raises(CatalogError, match=r"nospec.csv: no 'spec' column"):
        read_catalog(csv)
    csv2 = tmp_path / "nolabels.csv"
    csv2.write_text("spec,designation,vmic\na,J1,1.2\n")
    with pytest.raises(CatalogError, match=r"nolabels.csv: a reference catalogue needs at least one label"):
        read_catalog(csv2)
    assert read_catalog(csv2, require_labels=False).elements == []  # prediction: labels optional
    assert read_catalog(csv2, ["vmic"]).elements == ["VMIC"]  # any numeric column the user names
    with pytest.raises(CatalogError, match=r"column 'designation' \(label DESIGNATION\) holds no numbers"):
        read_catalog(csv2, ["designation"])
    params = tmp_path / "params.csv"
    params.write_text("spec,teff\na,5000\n")
    assert read_catalog(params).elements == ["TEFF"]  # stellar parameters alone are labels to learn
    only_spec = tmp_path / "pred.csv"
    only_spec.write_text("spec\na\nb\n")
    assert len(read_catalog(only_spec, ["C_FE"], require_labels=False).table) == 2
    with pytest.raises(ConfigError, match="valid choices: C_FE"):
        read_catalog(_with_c(tmp_path), ["CA_FE"])
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path / "missing.csv")


def _with_c(tmp_path: Path) -> Path:
    p = tmp_path / "c.csv"
    p.write_text("spec,C_FE\na,0.1\n")
    return p


def test_match_rules(tmp_path: Path) -> None:
    fits_dir, files = _fits_dir(
        tmp_path, ["spec-1-a_sp01-001.fits", "3703110.fits", "sub/spec-2.fits.gz", "extra.fits"]
    )
    (tmp_path / "outside.fits").write_bytes(b"x")
    csv = tmp_path / "X_FE.csv"
    csv.write_text(
        "spec,C_FE\n"
        "spec-1-a_sp01-001,0.1\n"  # without suffix
        "3703110,0.2\n"  # obsid
        "sub/spec-2.fits,0.3\n"  # relative path, .gz on disk
        "../outside.fits,0.4\n"  # escapes
        "missing.fits,0.5\n"
        "spec-1-a_sp01-001.fits,0.6\n"  # duplicate
        f"{tmp_path / 'outside.fits'},0.7\n"  # absolute path outside
    )
    cat = read_catalog(csv)
    m = match_catalog(cat, files, fits_dir)
    assert [f.name for f in m.files] == ["spec-1-a_sp01-001.fits", "3703110.fits", "spec-2.fits.gz"]
    assert m.rows.tolist() == [0, 1, 2]
    reasons = dict(m.unmatched_rows)
    assert reasons["../outside.fits"] == "path escapes the FITS directory"
    assert reasons[str(tmp_path / "outside.fits")] == "path escapes the FITS directory"
    assert reasons["missing.fits"] == "no FITS file"
    assert reasons["spec-1-a_sp01-001.fits"] == "duplicate row"
    assert [f.name for f in m.unmatched_files] == ["extra.fits"]
    s = m.summary()
    assert s["matched"] == 3 and s["unmatched_rows"] == 4 and s["unmatched_files"] == 1


def test_match_survives_symlink_loops(tmp_path: Path) -> None:
    from specabund.catalog import unreadable_reason

    fits_dir, files = _fits_dir(tmp_path, ["good.fits"])
    (fits_dir / "loop.fits").symlink_to("loop.fits")
    (fits_dir / "sub").mkdir()
    (fits_dir / "sub" / "a.fits").symlink_to("b.fits")
    (fits_dir / "sub" / "b.fits").symlink_to("a.fits")
    files = [*files, fits_dir / "loop.fits", fits_dir / "sub" / "a.fits", fits_dir / "sub" / "b.fits"]
    csv = tmp_path / "X_FE.csv"
    csv.write_text("spec,C_FE\ngood,0.1\nloop.fits,0.2\nsub/a.fits,0.3\n")
    m = match_catalog(read_catalog(csv), files, fits_dir)
    assert [f.name for f in m.files] == ["good.fits", "loop.fits", "a.fits"]
    assert [f.name for f in m.unmatched_files] == ["b.fits"]
    assert unreadable_reason(fits_dir / "good.fits") is None
    assert "symbolic links" in str(unreadable_reason(fits_dir / "loop.fits"))
