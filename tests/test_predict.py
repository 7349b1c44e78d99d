"""Prediction: MC-Dropout, ensembles, calibration, OOD flags, raw-FITS input, catalogue, repeats, CLI."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.table import Table
from click.testing import CliRunner

from helpers import noisy_dataset, saturating_lines
from specabund.dataset import Dataset, load_dataset
from specabund.errors import ConfigError, DataMismatchError
from specabund.models import default_config
from specabund.predict import (
    FLAG_BITS,
    PredictionInputs,
    StoredCalibration,
    calibrate,
    collect_files,
    contract_columns,
    coverage,
    fit_scale,
    load_stored,
    out_of_range,
    predict_with_uncertainty,
    read_prediction_catalog,
    repeat_pairs,
    resolve_preprocess,
    run_prediction,
)
from specabund.predict.uncertainty import mc_dropout_mode
from specabund.training import LoadedEnsemble, LoadedModel, TrainConfig, load_model, train

LABELS = ["C_FE", "MG_FE", "FE_H"]
SIM_LABELS = ["C_FE", "MG_FE", "CA_FE", "FE_H"]


def make_synthetic(n: int, n_pixels: int = 400, seed: int = 0, phash: str = "synth-v1") -> Dataset:
    """Absorption lines whose depth grows with one of three labels, white noise at the spectrum's SNR."""
    rng = np.random.default_rng(seed)
    wl = 4000.0 * 10 ** (1e-4 * np.arange(n_pixels))
    y = rng.normal(0.0, [0.2, 0.25, 0.4], size=(n, 3)).astype(np.float32)
    flux = saturating_lines(wl, y, 30)
    return noisy_dataset(
        flux, y, LABELS, wl, rng, snr_range=(20, 100), fe_h=y[:, 2], prefix=f"s{seed}_", preprocess_hash=phash
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small dropout network trained briefly on synthetic spectra (early stopping on ``es``), an
    independent calibration set ``val`` and a held-out ``test`` set from the same distribution."""
    tr, es = make_synthetic(800, seed=0), make_synthetic(300, seed=1)
    va, te = make_synthetic(1000, seed=20), make_synthetic(1000, seed=21)
    run = tmp_path_factory.mktemp("synth") / "run"
    mcfg = default_config("rescnn_small", dropout=0.2, head_dropout=0.2)
    cfg = TrainConfig(epochs=3, batch_size=64, learning_rate=3e-3, num_threads=2, seed=0)
    train(tr, es, LABELS, mcfg, cfg, run)
    model = load_model(run)
    assert isinstance(model, LoadedModel)
    return {"model": model, "train": tr, "val": va, "test": te, "run": run}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Simulated LAMOST FITS files, preprocessed by the pipeline, and a tiny model trained on them."""
    from specabund.preprocess import PipelineSettings, run_preprocess
    from specabund.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("sim")
    simulate_dataset(180, root, seed=5, layout="mixed", prediction_fraction=0.2)
    proc = root / "proc"
    run_preprocess(
        fits_dir=root / "fits",
        output_dir=proc,
        reference_csv=root / "X_FE.csv",
        prediction_csv=root / "galah_X_FE.csv",
        settings=PipelineSettings(chunk_size=200),
    )
    run = root / "run"
    mcfg = default_config("rescnn_small", dropout=0.1, head_dropout=0.1)
    cfg = TrainConfig(epochs=2, batch_size=32, learning_rate=3e-3, num_threads=2, seed=0)
    train(
        load_dataset(proc / "train_dataset.npz"),
        load_dataset(proc / "val_dataset.npz"),
        SIM_LABELS,
        mcfg,
        cfg,
        run,
    )
    return {"root": root, "proc": proc, "run": run}


# ------------------------------------------------------------------------------------------ MC-Dropout


def test_mc_dropout_spread_reproducible_and_rng_untouched(synth: dict) -> None:
    model, te = synth["model"], synth["test"]
    X, iv = te.X[:100], te.ivar[:100]
    state = torch.get_rng_state()
    a = predict_with_uncertainty(model, X, iv, n_samples=12, batch_size=32, seed=3)
    assert torch.equal(state, torch.get_rng_state()), "global torch RNG state changed"
    b = predict_with_uncertainty(model, X, iv, n_samples=12, batch_size=32, seed=3)
    c = predict_with_uncertainty(model, X, iv, n_samples=12, batch_size=32, seed=4)
    assert a.n_samples == 12 and a.labels == LABELS
    assert (a.err_model > 0).all()
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.err_model, b.err_model)
    assert not np.array_equal(a.mean, c.mean)
    np.testing.assert_allclose(a.err_total**2, a.err_model**2 + a.err_data**2)
    # a single pass is the deterministic eval-mode prediction: no model term
    one = predict_with_uncertainty(model, X, iv, n_samples=1)
    mean, sigma = model.predict(X, iv)
    np.testing.assert_allclose(one.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(one.err_data, sigma, rtol=1e-5)
    assert (one.err_model == 0).all()
    # the network is back in eval mode
    assert not any(m.training for m in model.model.modules())


def test_mc_dropout_mode_only_dropout_trains(synth: dict) -> None:
    net = synth["model"].model
    with mc_dropout_mode(net) as n_active:
        assert n_active > 0
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                assert not m.training
            if isinstance(m, torch.nn.Dropout):
                assert m.training
    assert not any(m.training for m in net.modules())


def test_shared_passes_equal_full_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Head-only dropout: the head's layers before the dropout run once per batch (and repeat count), not
    once per MC sample, the trunk runs a few spectra at a time, and the prediction is bit for bit the one
    of full head passes on one trunk pass per batch."""
    from specabund.models import build_model
    from specabund.predict import uncertainty
    from specabund.training.data import LabelScaler
    from specabund.training.saved import grid_info

    mcfg = default_config("rescnn_small", dropout=0.0, head_dropout=0.2)
    ds = make_synthetic(37, seed=3)
    net = build_model(mcfg, ds.n_pixels, len(LABELS)).eval()
    cfg = {"wavelength": grid_info(ds.wavelength), "preprocess_hash": "synth-v1", "labels": LABELS}
    scaler = LabelScaler(mean=np.zeros(len(LABELS)), std=np.ones(len(LABELS)))
    model = LoadedModel(
        model=net, run_dir=tmp_path, config=cfg, labels=LABELS, scaler=scaler, model_config=mcfg
    )
    n_fixed = uncertainty.deterministic_head_layers(net)
    assert n_fixed == [isinstance(m, torch.nn.Dropout) for m in net.head].index(True) > 0
    calls = {"n": 0}
    net.head[n_fixed - 1].register_forward_hook(lambda *a: calls.update(n=calls["n"] + 1))
    assert uncertainty.CPU_TRUNK_ROWS < 37
    settings = [(8, None, 6), (5, 16, 7), (37, None, 3), (4, 1000, 9), (37, None, 1)]
    fast = [predict_with_uncertainty(model, ds.X, ds.ivar, n_samples=k, batch_size=b, max_rows=r, seed=4)
            for b, r, k in settings]  # fmt: skip
    batches = sum(-(-len(ds) // b) for b, _, _ in settings)
    assert calls["n"] <= 2 * batches  # at most two repeat counts per batch
    calls["n"] = 0
    monkeypatch.setattr(uncertainty, "deterministic_head_layers", lambda net: 0)
    monkeypatch.setattr(uncertainty, "CPU_TRUNK_ROWS", 10**6)
    for (b, r, k), got in zip(settings, fast, strict=True):
        want = predict_with_uncertainty(model, ds.X, ds.ivar, n_samples=k, batch_size=b, max_rows=r, seed=4)
        for name in ("mean", "err_model", "err_data"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (b, r, k, name)
        assert np.all(got.err_model > 0) == (k > 1)
    assert calls["n"] > 2 * batches  # full head passes: once per pass of the MC samples


def test_requested_label_not_predicted_is_clear_error(synth: dict) -> None:
    te = synth["test"]
    with pytest.raises(ConfigError, match="valid choices: C_FE, MG_FE, FE_H"):
        predict_with_uncertainty(synth["model"], te.X[:4], te.ivar[:4], labels=["BA_FE"])
    sub = predict_with_uncertainty(synth["model"], te.X[:4], te.ivar[:4], labels=["mg_fe"], n_samples=2)
    assert sub.labels == ["MG_FE"] and sub.mean.shape == (4, 1)


def test_ensemble_identical_members_zero_spread(synth: dict) -> None:
    model, te = synth["model"], synth["test"]
    X, iv = te.X[:50], te.ivar[:50]
    ens = LoadedEnsemble(members=[model, model, model], run_dir=synth["run"])
    single = predict_with_uncertainty(model, X, iv, n_samples=1)
    out = predict_with_uncertainty(ens, X, iv, n_samples=1, ensemble_mode=True)
    assert out.n_members == 3
    np.testing.assert_allclose(out.err_model, 0.0, atol=1e-12)
    np.testing.assert_allclose(out.mean, single.mean)
    np.testing.assert_allclose(out.err_data, single.err_data)
    # members that differ give a spread
    other = load_model(synth["run"])
    assert isinstance(other, LoadedModel)
    with torch.no_grad():
        other.model.head[-1].bias.add_(0.1)
    out2 = predict_with_uncertainty(
        LoadedEnsemble(members=[model, other], run_dir=synth["run"]), X, iv, n_samples=1, ensemble_mode=True
    )
    assert (out2.err_model > 0).all()
    with pytest.raises(DataMismatchError, match="ensemble"):
        predict_with_uncertainty(model, X, iv, ensemble_mode=True)


def test_progress_callback_counts_spectra(synth: dict, tmp_path: Path) -> None:
    model, te = synth["model"], synth["test"]
    X, iv = te.X[:50], te.ivar[:50]
    calls: list[int] = []
    quiet = predict_with_uncertainty(model, X, iv, n_samples=3, batch_size=16, seed=1)
    out = predict_with_uncertainty(model, X, iv, n_samples=3, batch_size=16, seed=1, progress=calls.append)
    assert calls == [16, 16, 16, 2]
    np.testing.assert_array_equal(out.mean, quiet.mean)  # reporting changes nothing
    calls.clear()  # three members: a spectrum is done once every member has predicted it
    ens = LoadedEnsemble(members=[model, model, model], run_dir=synth["run"])
    predict_with_uncertainty(ens, X, iv, n_samples=1, batch_size=16, ensemble_mode=True,
                             progress=calls.append)  # fmt: skip
    assert sum(calls) == 50 and all(c > 0 for c in calls) and len(calls) > 3
    calls.clear()
    inputs = PredictionInputs.from_dataset(te.subset(np.arange(30)))
    run_prediction(model, inputs, tmp_path / "p", n_samples=2, batch_size=8, chunk_size=20, plots=False,
                   progress=calls.append)  # fmt: skip
    assert calls == [8, 8, 4, 8, 2]


# ------------------------------------------------------------------------------------------ calibration


def test_fit_scale_and_coverage() -> None:
    z = np.random.default_rng(0).normal(0, 2.0, 20000)
    assert fit_scale(z, "coverage") == pytest.approx(2.0, rel=0.03)
    assert fit_scale(z, "mad") == pytest.approx(2.0, rel=0.03)
    assert coverage(z / 2.0, 0.6827) == pytest.approx(0.6827, abs=0.01)
    assert coverage(z / 2.0, 0.9545) == pytest.approx(0.9545, abs=0.01)
    assert fit_scale(np.array([np.nan, 1.0])) == 1.0


def test_calibration_brings_coverage_to_68(synth: dict) -> None:
    model = synth["model"]
    res = calibrate(
        model, synth["val"], train_dataset=synth["train"], test_dataset=synth["test"], n_samples=8, seed=0
    )
    assert (synth["run"] / "calibration.json").exists()
    assert (synth["run"] / "ood_reference.npz").exists()
    for lab in LABELS:
        entry = res.report["labels"][lab]
        assert entry["test_after"]["coverage_68"] == pytest.approx(0.6827, abs=0.05), (lab, entry)
        assert entry["val_after"]["coverage_68"] == pytest.approx(0.6827, abs=0.01)
    # before calibration the briefly trained network is off somewhere
    before = [res.report["labels"][lab]["test_before"]["coverage_68"] for lab in LABELS]
    assert max(abs(b - 0.6827) for b in before) > 0.05
    stored = load_stored(model)
    assert stored.calibrated and stored.range_source == "train" and stored.ood is not None
    np.testing.assert_allclose(stored.scale_for(LABELS), res.scale)
    # another mode has no calibration of its own
    ens = LoadedEnsemble(members=[model], run_dir=synth["run"])
    assert not load_stored(ens, ensemble_mode=True).calibrated


def test_ood_statistics_follow_their_definition() -> None:
    """SpectralOOD.score (in place, for speed) gives exactly the statistics of the module docstring written
    out on the network view, also with pixels without data and spectra without any."""
    from specabund.predict.ood import RESIDUAL_FLOOR, SpectralOOD, network_view

    ds = make_synthetic(60, seed=4)
    rng = np.random.default_rng(1)
    X, iv = ds.X.copy(), ds.ivar.copy()
    X[rng.random(X.shape) < 0.02] = np.nan
    iv[rng.random(X.shape) < 0.02] = 0.0
    iv[rng.random(X.shape) < 0.01] = -1.0
    iv[rng.random(X.shape) < 0.01] = np.inf
    X[3], iv[4], X[5] = np.nan, 0.0, X[5] * 40
    ood = SpectralOOD.fit(ds.X, ds.ivar, n_components=5)
    f, good = network_view(X, iv)
    A = f - ood.mean
    scores = A @ ood.components.T
    dist = np.sqrt(np.sum(scores**2 / ood.variances, axis=1))
    var = np.where(good, 1.0 / np.where(good, iv.astype(np.float64), 1.0) + RESIDUAL_FLOOR**2, np.inf)
    chi = np.where(good, (A - scores @ ood.components) ** 2 / var, 0.0)
    n = good.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = np.where(n > 0, chi.sum(axis=1) / np.maximum(n, 1), np.inf)
    for chunk in (4096, 7):
        d, r = ood.score(X, iv, chunk=chunk)
        assert np.array_equal(d, dist) and np.array_equal(r, resid)
    assert np.isinf(r[[3, 4]]).all() and np.isfinite(r[5]) and np.isfinite(np.delete(r, [3, 4])).all()


def test_predict_applies_calibration_and_flags_ood(synth: dict, tmp_path: Path) -> None:
    model, te = synth["model"], synth["test"]
    if load_stored(model).ood is None:
        calibrate(model, synth["val"], train_dataset=synth["train"], n_samples=5)
    stored = load_stored(model)
    flat = te.subset(np.arange(3))
    flat.X[:] = 1.0  # a flat line: no absorption lines at all
    ds = Dataset.concatenate([te.subset(np.arange(200)), flat])
    inputs = PredictionInputs.from_dataset(ds)
    summary = run_prediction(model, inputs, tmp_path / "out", n_samples=5, batch_size=64, plots=False)
    df = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert list(df.columns[: len(contract_columns(LABELS))]) == contract_columns(LABELS)
    spectral = FLAG_BITS["spectrum_far"] | FLAG_BITS["spectrum_residual"]
    assert (df["flag"].to_numpy()[-3:] & spectral != 0).all()
    assert all("spectrum" in r for r in df["flag_reason"].iloc[-3:])
    normal = df["flag"].to_numpy()[:200]
    assert np.mean(normal & spectral != 0) < 0.05
    assert ((df["flag"] == 0) == (df["flag_reason"] == "")).all()
    assert summary["calibrated"]
    raw = predict_with_uncertainty(model, ds.X[:5], ds.ivar[:5], n_samples=1)
    assert summary["calibration_scale"]["C_FE"] == pytest.approx(stored.scale["C_FE"])
    # uncalibrated run: errors differ by exactly the scale
    run_prediction(
        model, inputs, tmp_path / "raw", n_samples=5, batch_size=64, plots=False, apply_calibration=False
    )
    raw_df = pd.read_csv(tmp_path / "raw" / "predictions.csv", keep_default_na=False)
    for lab in LABELS:
        np.testing.assert_allclose(df[f"{lab}_err"], raw_df[f"{lab}_err"] * stored.scale[lab], rtol=1e-6)
        np.testing.assert_allclose(df[lab], raw_df[lab])
    assert raw.mean.shape == (5, 3)
    # reference labels present -> metrics and coverage reported
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) == set(LABELS) and metrics["C_FE"]["all"]["n"] == 203


def test_label_range_flag(synth: dict, tmp_path: Path) -> None:
    pred = np.array([[0.0, 1.0], [2.0, np.nan]])
    flags = out_of_range(pred, np.array([-1.0, 0.0]), np.array([1.0, 0.5]))
    assert flags.tolist() == [[False, True], [True, False]]
    te = synth["test"].subset(np.arange(20))
    narrow = StoredCalibration(
        scale={},
        label_min={lab: -1e-6 for lab in LABELS},
        label_max={lab: 1e-6 for lab in LABELS},
        range_source="test",
        ood=None,
        calibrated=False,
    )
    run_prediction(
        synth["model"],
        PredictionInputs.from_dataset(te),
        tmp_path,
        n_samples=2,
        calibration=narrow,
        plots=False,
    )
    df = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert (df["flag"] & FLAG_BITS["label_out_of_range"] != 0).all()
    assert df["flag_reason"].str.contains("outside training range").all()


def test_repeat_pairs_pulls() -> None:
    rng = np.random.default_rng(1)
    n_star = 3000
    truth = rng.normal(0, 0.3, n_star)
    sig = rng.uniform(0.05, 0.2, (n_star, 2))
    mean = truth[:, None] + rng.normal(size=(n_star, 2)) * sig
    groups = np.repeat(np.arange(n_star).astype(str), 2)
    pairs = repeat_pairs(groups, groups, ["X_FE"], mean.reshape(-1, 1), sig.reshape(-1, 1))
    assert len(pairs) == n_star
    assert np.std(pairs["X_FE_pull"]) == pytest.approx(1.0, abs=0.05)
    # too-small errors show up as a wide pull distribution
    small = repeat_pairs(groups, groups, ["X_FE"], mean.reshape(-1, 1), 0.5 * sig.reshape(-1, 1))
    assert np.std(small["X_FE_pull"]) == pytest.approx(2.0, abs=0.1)


# ------------------------------------------------------------------------------------------ raw FITS


def test_raw_fits_prediction_equals_preprocessed(sim: dict, tmp_path: Path) -> None:
    model = load_model(sim["run"])
    opts, normalize, source = resolve_preprocess(model, None, [sim["proc"] / "manifest.json"])
    assert source.endswith("manifest.json")
    pre = PredictionInputs.from_dataset(load_dataset(sim["proc"] / "prediction_dataset.npz"))
    cat = read_prediction_catalog(sim["root"] / "galah_X_FE.csv")
    files, root = collect_files(sim["root"] / "fits")
    raw = PredictionInputs.from_fits(files, opts, normalize=normalize, catalog=cat, fits_dir=root)
    assert raw.preprocess_hash == pre.preprocess_hash
    ok_raw = raw.spec[raw.ok]
    # every catalogue row's spectrum (in catalogue order) equals the preprocessed one
    pos = {s: i for i, s in enumerate(ok_raw)}
    idx = np.array([pos[s] for s in pre.spec])
    np.testing.assert_array_equal(raw.X[idx], pre.X)
    np.testing.assert_array_equal(raw.ivar[idx], pre.ivar)
    a = predict_with_uncertainty(model, pre.X, pre.ivar, n_samples=5, seed=2)
    b = predict_with_uncertainty(model, raw.X[idx], raw.ivar[idx], n_samples=5, seed=2)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.err_total, b.err_total, rtol=1e-6, atol=1e-7)
    # end to end, with a broken file and a missing file in a file list: every input gets a row
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join([*(str(f) for f in files[:20]), str(bad), str(tmp_path / "missing.fits")]))
    paths, _ = collect_files(files=str(lst))
    inputs = PredictionInputs.from_fits(paths, opts, normalize=normalize)
    run_prediction(model, inputs, tmp_path / "out", n_samples=3, plots=False)
    df = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert len(df) == 22
    tail = df.iloc[-2:]
    assert (tail["flag"] & FLAG_BITS["failed"] != 0).all()
    assert tail["flag_reason"].str.startswith("unreadable").all()
    assert (tail["C_FE"] == "").all()


def test_lamost_repeats_every_file_gets_a_row(sim: dict, lamost_dir: Path, tmp_path: Path) -> None:
    model = load_model(sim["run"])
    rep_dir = lamost_dir / "dr8-repeats"
    groups = pd.read_csv(rep_dir / "repeat_groups.csv")
    cat_path = tmp_path / "repeats.csv"
    pd.DataFrame(
        {
            "spec": [Path(f).name for f in groups["combined_file"]],
            "group": groups["GroupID"].astype(int).astype(str),
        }
    ).to_csv(cat_path, index=False)
    opts, normalize, _ = resolve_preprocess(model)
    files, root = collect_files(rep_dir)
    assert len(files) == 56
    inputs = PredictionInputs.from_fits(
        files, opts, normalize=normalize, catalog=read_prediction_catalog(cat_path), fits_dir=root
    )
    summary = run_prediction(model, inputs, tmp_path / "out", n_samples=5, batch_root=tmp_path / "res")
    df = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert len(df) == 56 and set(df["filename"]) == {f.name for f in files}
    has_value = df["C_FE"] != ""
    assert (has_value | (df["flag"] & FLAG_BITS["failed"] != 0)).all()
    assert has_value.sum() >= 40  # real spectra at SNR 30-375 pass the quality cuts
    rep = json.loads((tmp_path / "out" / "repeats.json").read_text())
    both_ok = df[has_value].groupby("group").size()
    assert rep["n_pairs"] == int((both_ok >= 2).sum()) > 10
    assert summary["repeats"]["n_groups"] == rep["n_groups"]
    assert (tmp_path / "out" / "repeats_pulls.png").exists()
    assert (tmp_path / "res" / "prediction_C_FE_batch_results" / "batch_1_distribution.png").exists()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_calibrate_then_predict(sim: dict, tmp_path: Path) -> None:
    from specabund.cli import main
    from specabund.cli import predict as _predict_cli  # noqa: F401  (registers the command)

    shutil.copytree(sim["run"], tmp_path / "models" / "tiny")
    for f in ("calibration.json", "ood_reference.npz"):
        (tmp_path / "models" / "tiny" / f).unlink(missing_ok=True)
    proc = sim["proc"]
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["--workdir", str(tmp_path), "predict", "--calibrate", "--data-path", str(proc / "val_dataset.npz"),
         "--model", "tiny", "--mc-samples", "5", "--output-dir", "calib", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "calib" / "calibration_report.json").read_text())
    assert report["train_data"].endswith("train_dataset.npz") and "test_before" in report["labels"]["C_FE"]
    assert (tmp_path / "calib" / "calibration_z_histograms.png").exists()
    assert (tmp_path / "models" / "tiny" / "calibration.json").exists()

    res = runner.invoke(
        main,
        ["--workdir", str(tmp_path), "predict", "--data-path", str(proc / "prediction_dataset.npz"),
         "--elements", "C_FE", "MG_FE", "--mc-samples", "5", "--device", "auto"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "results" / "predictions"
    df = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(df.columns[:12]) == contract_columns(["C_FE", "MG_FE"])
    t = Table.read(out / "predictions.fits")
    assert list(t.colnames) == list(df.columns) and len(t) == len(df)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibrated"] and summary["labels"] == ["C_FE", "MG_FE"]
    for f in ("metrics.json", "C_FE_one_to_one.png", "residual_histograms.png", "resolved_config.toml"):
        assert (out / f).exists(), f
    tracking = pd.read_csv(tmp_path / "results" / "prediction_MG_FE_batch_results" / "batch_tracking.csv")
    assert len(tracking) == 1 and "ref_rmse" in tracking
    logged = "".join(p.read_text() for p in (tmp_path / "logs" / "predict").glob("*.log"))
    n_pred = summary["n_predicted"]
    assert re.search(rf"predict: {n_pred}/{n_pred} spectra, [0-9.]+ spectra/s, elapsed \S+, ETA 0s", logged)

    res = runner.invoke(
        main,
        ["--workdir", str(tmp_path), "predict", "--data-path", str(proc / "prediction_dataset.npz"),
         "--elements", "BA_FE", "--mc-samples", "2"],
    )  # fmt: skip
    assert res.exit_code == 1 and "valid choices" in res.output

    fits = sorted((sim["root"] / "fits").iterdir())[:20]
    (tmp_path / "list.txt").write_text("\n".join(str(f) for f in fits))
    res = runner.invoke(
        main,
        ["--workdir", str(tmp_path), "predict", "--files", str(tmp_path / "list.txt"),
         "--catalog", str(sim["root"] / "galah_X_FE.csv"), "--preprocess-config", str(proc / "manifest.json"),
         "--mc-samples", "3", "--output-dir", "raw", "--no-plots"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    raw = pd.read_csv(tmp_path / "raw" / "predictions.csv", keep_default_na=False)
    assert len(raw) >= 20  # every listed file, plus catalogue rows whose file was not listed (flagged)
    assert set(raw["filename"]) - {""} == {f.name for f in fits}
    assert (raw.loc[raw["filename"] == "", "flag_reason"] == "no FITS file").all()


def test_preprocess_config_mismatch_is_error(sim: dict, tmp_path: Path) -> None:
    model = load_model(sim["run"])
    manifest = json.loads((sim["proc"] / "manifest.json").read_text())
    manifest["options"]["min_snr"] = 7.0
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(manifest))
    with pytest.raises(DataMismatchError, match="preprocess_hash"):
        resolve_preprocess(model, p)
    odd = replace(model, config={**model.config, "preprocess_hash": "0000"})
    with pytest.raises(DataMismatchError, match="--preprocess-config"):
        resolve_preprocess(odd)


def test_default_head_only_dropout_calibrates_and_separates_errors(tmp_path: Path) -> None:
    """The default design (dropout only in the head, MSE mean + detached variance): MC samples share one
    trunk pass, the model and data terms are both non-zero, and calibration on held-out stars gives 68 %
    coverage on another held-out set."""
    from specabund.predict.uncertainty import head_only_dropout

    tr, es = make_synthetic(800, seed=0), make_synthetic(300, seed=1)
    va, te = make_synthetic(1000, seed=22), make_synthetic(1000, seed=23)
    mcfg = default_config("rescnn_small", dropout=0.0, head_dropout=0.2)
    cfg = TrainConfig(epochs=3, batch_size=64, num_threads=2)
    assert cfg.loss == "mse"
    train(tr, es, LABELS, mcfg, cfg, tmp_path / "run")
    model = load_model(tmp_path / "run")
    assert isinstance(model, LoadedModel) and head_only_dropout(model.model)
    up = predict_with_uncertainty(model, te.X[:200], te.ivar[:200], n_samples=16, seed=0)
    assert np.all(up.err_model > 0) and np.all(up.err_data > 0)
    res = calibrate(model, va, train_dataset=tr, test_dataset=te, n_samples=16, seed=0)
    for lab in LABELS:
        entry = res.report["labels"][lab]
        assert entry["test_after"]["coverage_68"] == pytest.approx(0.6827, abs=0.05), (lab, entry)


# ------------------------------------------------------------------------ calibration with label errors


def test_scale_fitted_with_label_errors_recovers_the_prediction_error() -> None:
    """Residuals = prediction error (sigma 1) + label error (sigma 2): the predicted sigma (3, too large)
    must shrink to 1, not to the residual width sqrt(5) that ignoring the label errors gives."""
    from specabund.predict.calibration import fit_scale, fit_scale_noisy_labels

    rng = np.random.default_rng(0)
    n = 20000
    resid = rng.normal(0, 1.0, n) + rng.normal(0, 2.0, n)
    sigma = np.full(n, 3.0)
    err = np.full(n, 2.0)
    for method in ("coverage", "mad"):
        k = fit_scale_noisy_labels(resid, sigma, err, method)
        assert k * 3.0 == pytest.approx(1.0, rel=0.05), method
        assert fit_scale(resid / sigma, method) * 3.0 == pytest.approx(np.sqrt(5.0), rel=0.05)
    # without label errors it is the plain scale; labels noisier than the residuals: the floor
    assert fit_scale_noisy_labels(resid, sigma, np.zeros(n)) == pytest.approx(
        fit_scale(resid / sigma), rel=1e-6
    )
    assert fit_scale_noisy_labels(rng.normal(0, 1.0, n), sigma, np.full(n, 5.0)) == 1e-3


def test_label_errors_of_prefers_the_catalogue_then_the_assumed_value() -> None:
    from specabund.predict.calibration import label_errors_of

    n, labs = 6, ["TEFF", "MG_FE"]
    y_err = np.full((n, 2), np.nan, dtype=np.float32)
    y_err[:3, 0] = 0.05
    col = np.zeros(n)
    ds = Dataset(
        X=np.ones((n, 4), np.float32), ivar=np.ones((n, 4), np.float32), wavelength=np.arange(4.0) + 4000,
        y=np.zeros((n, 2)), elements=labs, filenames=col.astype(str), obsid=col.astype(str),
        spec=col.astype(str), teff=col, logg=col, fe_h=col, snr=col, split=col.astype(np.int8),
        group=col.astype(str), y_err=y_err,
    )  # fmt: skip
    e = label_errors_of(ds, labs, {labs[0]: 0.2})
    np.testing.assert_allclose(e[:, 0], [0.05, 0.05, 0.05, 0.2, 0.2, 0.2], rtol=1e-6)
    assert np.all(e[:, 1] == 0)
    assert np.all(label_errors_of(replace(ds, y_err=None), labs) == 0)


def test_cli_calibrate_with_assumed_label_errors(sim: dict, tmp_path: Path) -> None:
    from specabund.cli import main
    from specabund.cli import predict as _predict_cli  # noqa: F401  (registers the command)

    shutil.copytree(sim["run"], tmp_path / "models" / "tiny")
    proc = sim["proc"]
    args = ["--workdir", str(tmp_path), "predict", "--calibrate", "--model", "tiny"]
    args += ["--data-path", str(proc / "val_dataset.npz"), "--mc-samples", "5"]
    args += ["--output-dir", "calib", "--device", "cpu", "--no-plots"]
    runner = CliRunner()
    res = runner.invoke(main, [*args, "--label-error", "c_fe=0.03"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "calib" / "calibration_report.json").read_text())
    c = report["labels"]["C_FE"]
    assert c["label_errors"]["assumed"] == 0.03 and c["label_errors"]["fraction_known"] == 1.0
    assert "label_errors" not in report["labels"]["MG_FE"]
    # the scale that leaves room for the labels' own error is smaller than the one that does not
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "calib" / "calibration_report.json").read_text())["labels"]["C_FE"]
    assert c["scale"] < plain["scale"]
    for bad in ("C_FE", "C_FE=-1", "=0.1"):
        res = runner.invoke(main, [*args, "--label-error", bad])
        assert res.exit_code == 2 and "--label-error" in res.output, res.output
