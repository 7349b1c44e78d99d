"""Evaluation outputs (metrics, predictions contract, plots) and MIST isochrone parsing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import noisy_dataset
from specabund.dataset import Dataset
from specabund.errors import DataMismatchError, SpecabundError
from specabund.metrics import regression_metrics
from specabund.models import default_config
from specabund.training import LoadedModel, TrainConfig, evaluate, load_model, read_mist_iso, train

LABELS = ["MG_FE", "FE_H"]

MIST_TEXT = """\
# MIST version number  = 1.2
# MESA revision number =     7503
# --------------------------------------------------------------------------------------
# Yinit        Zinit   [Fe/H]   [a/Fe]  v/vcrit
#   0.2703  1.42857E-02    -0.25     0.00     0.40
# --------------------------------------------------------------------------------------
# number of isochrones =      2
# --------------------------------------------------------------------------------------
# number of EEPs, cols =     3    6
#    1                  2                  3                  4                  5        6
# EEP     log10_isochrone_age_yr       initial_mass           log_Teff            log_g    phase
   202   9.000000000000000E+00   8.000000000000000E-01   3.700000000000000E+00   4.600000000000000E+00   0.0
   300   9.000000000000000E+00   1.000000000000000E+00   3.760000000000000E+00   4.400000000000000E+00   0.0
   500   9.000000000000000E+00   1.200000000000000E+00   3.680000000000000E+00   2.500000000000000E+00   2.0


# number of EEPs, cols =     2    6
#    1                  2                  3                  4                  5        6
# EEP     log10_isochrone_age_yr       initial_mass           log_Teff            log_g    phase
   202   1.000000000000000E+01   7.000000000000000E-01   3.650000000000000E+00   4.700000000000000E+00   0.0
   450   1.000000000000000E+01   9.000000000000000E-01   3.670000000000000E+00   3.000000000000000E+00   2.0
"""


def make_dataset(n: int = 240, n_pixels: int = 400, seed: int = 0, preprocess_hash: str = "h1") -> Dataset:
    """Absorption lines whose depth follows MG_FE (odd lines) and FE_H (even lines), white noise."""
    rng = np.random.default_rng(seed)
    wl = 4500.0 * 10 ** (1e-4 * np.arange(n_pixels))
    centres = np.linspace(wl[10], wl[-10], 20)
    y = rng.normal(0, [0.2, 0.4], size=(n, 2)).astype(np.float32)
    prof = np.exp(-0.5 * ((wl[None, :] - centres[:, None]) / (2.5 * (wl[1] - wl[0]))) ** 2)
    depth = 0.3 * np.exp(1.5 * y[:, np.arange(20) % 2])
    fe_h = y[:, 1].copy()
    y[rng.random(n) < 0.1, 0] = np.nan
    split = np.where(np.arange(n) < 0.6 * n, 0, np.where(np.arange(n) < 0.8 * n, 1, 2))
    return noisy_dataset(
        np.exp(-depth @ prof),
        y,
        LABELS,
        wl,
        rng,
        snr_range=(10, 200),
        split=split,
        teff=rng.uniform(4000, 6500, n),
        logg=rng.uniform(1.0, 4.8, n),
        fe_h=fe_h,
        prefix="spec",
        preprocess_hash=preprocess_hash,
    )


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Dataset]:
    ds = make_dataset()
    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = TrainConfig(epochs=3, batch_size=32, learning_rate=3e-3, num_threads=1, seed=0)
    train(ds.split_subset("train"), ds.split_subset("val"), LABELS, default_config("rescnn_small"), cfg, run)
    model = load_model(run)
    assert isinstance(model, LoadedModel)
    return model, ds


@pytest.fixture
def mist_file(tmp_path: Path) -> Path:
    path = tmp_path / "MIST_test.iso"
    path.write_text(MIST_TEXT)
    return path


def test_read_mist_iso(mist_file: Path) -> None:
    blocks = read_mist_iso(mist_file)
    assert len(blocks) == 2
    a, b = blocks
    assert list(a.columns) == ["EEP", "log10_isochrone_age_yr", "initial_mass", "log_Teff", "log_g", "phase"]
    assert len(a) == 3 and len(b) == 2
    assert a["EEP"].tolist() == [202, 300, 500] and a["phase"].dtype.kind == "i"
    np.testing.assert_allclose(a["log_Teff"], [3.70, 3.76, 3.68])
    np.testing.assert_allclose(b["log_g"], [4.7, 3.0])
    assert a.attrs["log10_isochrone_age_yr"] == 9.0 and b.attrs["log10_isochrone_age_yr"] == 10.0
    assert a.attrs["feh"] == -0.25


def test_read_mist_iso_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecabundError, match="not found"):
        read_mist_iso(tmp_path / "missing.iso")
    bad = tmp_path / "bad.iso"
    bad.write_text(MIST_TEXT.replace("   0.0\n   300", "\n   300", 1))
    with pytest.raises(SpecabundError, match="columns"):
        read_mist_iso(bad)
    empty = tmp_path / "empty.iso"
    empty.write_text("# only comments\n# nothing else\n")
    with pytest.raises(SpecabundError, match="no isochrone block"):
        read_mist_iso(empty)


def test_evaluate_writes_contract_outputs(
    model_and_data: tuple[LoadedModel, Dataset], mist_file: Path, tmp_path: Path
) -> None:
    model, ds = model_and_data
    test = ds.split_subset("test")
    out = tmp_path / "eval"
    result = evaluate(model, test, None, out, isochrones=mist_file)

    pred = pd.read_csv(out / "predictions.csv")
    expected = ["spec", "snr"] + [f"{lab}_{k}" for lab in LABELS for k in ("true", "pred", "err")]
    assert list(pred.columns) == expected
    assert pred["spec"].tolist() == test.spec.tolist()
    mean, sigma = model.predict(test.X, test.ivar)
    np.testing.assert_allclose(pred["MG_FE_pred"], mean[:, 0], rtol=1e-6)
    np.testing.assert_allclose(pred["FE_H_err"], sigma[:, 1], rtol=1e-6)
    np.testing.assert_allclose(pred["MG_FE_true"], test.y[:, 0], rtol=1e-6)  # NaN kept as NaN
    assert pred["MG_FE_true"].isna().sum() == np.isnan(test.y[:, 0]).sum()

    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == ["label", "subset", "n", "mae", "rmse", "bias", "robust_scatter", "r2"]
    subsets = set(table["subset"])
    assert {"all", "snr_<20", "snr_20-50", "snr_50-100", "snr_>100", "dwarfs", "giants"} == subsets
    for lab in LABELS:
        t = table[table["label"] == lab].set_index("subset")
        n_all = int(t.loc["all", "n"])
        assert n_all == np.isfinite(test.y[:, LABELS.index(lab)]).sum()
        assert t.loc[[s for s in subsets if s.startswith("snr_")], "n"].sum() == n_all
        assert t.loc["dwarfs", "n"] + t.loc["giants", "n"] == n_all
        ref = regression_metrics(test.y[:, LABELS.index(lab)], mean[:, LABELS.index(lab)])
        assert t.loc["all", "rmse"] == pytest.approx(ref["rmse"])
        giants = test.logg < 3.8
        ref_g = regression_metrics(test.y[giants, LABELS.index(lab)], mean[giants, LABELS.index(lab)])
        assert t.loc["giants", "mae"] == pytest.approx(ref_g["mae"])

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["FE_H"]["all"]["rmse"] == pytest.approx(result["metrics"]["FE_H"]["all"]["rmse"])
    assert saved["logg_split"] == 3.8 and saved["n_spectra"] == len(test)
    for lab in LABELS:
        for kind in ("one_to_one", "residuals_vs_params", "kiel"):
            assert (out / f"{lab}_{kind}.png").stat().st_size > 1000
    assert (out / "residual_histograms.png").stat().st_size > 1000


def test_evaluate_subset_of_labels_and_custom_bins(
    model_and_data: tuple[LoadedModel, Dataset], tmp_path: Path
) -> None:
    model, ds = model_and_data
    res = evaluate(
        model, ds.split_subset("val"), ["FE_H"], tmp_path, snr_bins=(0, 100, np.inf), plots_enabled=False
    )
    assert list(res["metrics"]) == ["FE_H"]
    assert set(res["metrics"]["FE_H"]) == {"all", "snr_<100", "snr_>100", "dwarfs", "giants"}
    assert list(pd.read_csv(tmp_path / "predictions.csv").columns) == [
        "spec",
        "snr",
        "FE_H_true",
        "FE_H_pred",
        "FE_H_err",
    ]
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(DataMismatchError, match="does not predict"):
        evaluate(model, ds, ["C_FE"], tmp_path)


def test_evaluate_refuses_incompatible_data(
    model_and_data: tuple[LoadedModel, Dataset], tmp_path: Path
) -> None:
    model, ds = model_and_data
    with pytest.raises(DataMismatchError, match="preprocess_hash"):
        evaluate(model, replace(ds, preprocess_hash="h2"), None, tmp_path)
    with pytest.raises(DataMismatchError, match="wavelength grid"):
        evaluate(model, make_dataset(n=20, n_pixels=380), None, tmp_path)
    assert not (tmp_path / "predictions.csv").exists()
