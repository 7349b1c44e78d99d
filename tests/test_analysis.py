"""Feature importance (integrated gradients, occlusion, line identification), residual analysis, batch
tracking with resume, and the ``specabund analyze`` command.

The trained model of this module is a small 'rescnn_small' fitted on simulated spectra whose labels are
drawn independently (``draw_labels(independent=True)``), so no correlation between labels can explain
which lines it uses. To keep the training to a few tens of seconds on two CPU cores:

* the spectra cover 3900-5300 A on a log grid of 2e-4 dex (667 pixels) - the region holding the Ca II H&K
  and Ca I 4227 lines and the Mg b triplet, the strongest Ca and Mg features of the simulator;
* Teff, logg and [Fe/H] are drawn independently over narrower ranges than ``INDEPENDENT_RANGES``
  (4800-6000 K, 2.5-4.5, -0.8..0.2) and the SNR is high (150-300), so 8 epochs suffice to learn both labels;
* the loss is the masked MSE throughout (the Gaussian NLL lets a small network give up on one label).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from specabund.analysis import (
    ImportanceSettings,
    LabelMean,
    explain_importance,
    integrated_gradients,
    occlusion,
    own_line_mask,
    run_feature_importance,
    run_residual_analysis,
    top_regions,
)
from specabund.analysis.importance import AttributionStats, agreement
from specabund.cli import analyze as _analyze_cli  # noqa: F401  (registers the commands)
from specabund.cli import main
from specabund.dataset import Dataset, save_dataset
from specabund.elements import element_of_label
from specabund.errors import DataMismatchError
from specabund.lines import load_linelist
from specabund.metrics import regression_metrics
from specabund.models import default_config
from specabund.simulate import draw_labels, normalized_model_flux
from specabund.training import AugmentConfig, LoadedModel, TrainConfig, load_model, train

LABELS = ["MG_FE", "CA_FE"]
GRID = 10 ** np.arange(np.log10(3900.0), np.log10(5300.0), 2e-4)
PREPROCESS_HASH = "sim-analysis-v1"


def simulate(n: int, seed: int, split: int | None = None) -> Dataset:
    """Noisy simulated spectra with independent labels on ``GRID``."""
    rng = np.random.default_rng(seed)
    lab = draw_labels(n, rng, independent=True)
    lab["teff"] = rng.uniform(4800, 6000, n)
    lab["logg"] = rng.uniform(2.5, 4.5, n)
    lab["fe_h"] = rng.uniform(-0.8, 0.2, n)
    flux = np.stack([normalized_model_flux(r, GRID) for r in lab.to_dict("records")])
    snr = rng.uniform(150, 300, n)
    X = (flux + rng.normal(size=flux.shape) / snr[:, None]).astype(np.float32)
    ivar = np.repeat((snr**2)[:, None], GRID.size, axis=1).astype(np.float32)
    cols = ["MG_FE", "CA_FE", "C_FE", "teff", "logg", "fe_h"]
    if split is None:
        sp = np.zeros(n, dtype=np.int8)
        sp[int(0.88 * n) :] = 1
    else:
        sp = np.full(n, split, dtype=np.int8)
    names = np.array([f"sim{seed}_{i:04d}" for i in range(n)])
    return Dataset(
        X=X,
        ivar=ivar,
        wavelength=GRID.copy(),
        y=lab[cols].to_numpy(np.float32),
        elements=["MG_FE", "CA_FE", "C_FE", "TEFF", "LOGG", "FE_H"],
        filenames=np.array([f"{s}.fits" for s in names]),
        obsid=names,
        spec=names,
        teff=lab["teff"].to_numpy(np.float32),
        logg=lab["logg"].to_numpy(np.float32),
        fe_h=lab["fe_h"].to_numpy(np.float32),
        snr=snr.astype(np.float32),
        split=sp,
        group=names,
        preprocess_hash=PREPROCESS_HASH,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Dataset, Path]:
    ds = simulate(560, seed=11)
    run_dir = tmp_path_factory.mktemp("models") / "mgca"
    epochs = 8
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=32,
        learning_rate=5e-3,
        early_stopping=0,
        mse_warmup_epochs=epochs,
        augment=AugmentConfig(enabled=False),
        seed=0,
    )
    train(
        ds.split_subset("train"), ds.split_subset("val"), LABELS, default_config("rescnn_small"), cfg, run_dir
    )
    model = load_model(run_dir)
    assert isinstance(model, LoadedModel)
    test = simulate(64, seed=99, split=2)
    return model, test, run_dir


@pytest.mark.slow
def test_model_learned_both_labels(trained: tuple[LoadedModel, Dataset, Path]) -> None:
    model, test, _ = trained
    mean, _ = model.predict(test.X, test.ivar)
    for j, lab in enumerate(LABELS):
        r2 = regression_metrics(test.y[:, test.label_index(lab)], mean[:, j])["r2"]
        assert r2 > 0.5, f"{lab}: R2 {r2:.2f}; the attribution test needs a model that learned the label"


@pytest.mark.slow
def test_integrated_gradients_completeness_and_eval_mode(trained: tuple[LoadedModel, Dataset, Path]) -> None:
    model, test, _ = trained
    X, ivar = test.X[:6].copy(), test.ivar[:6].copy()
    ivar[0, 100:120] = 0.0  # pixels without data
    model.model.train()  # must not matter: the attribution is of the prediction (eval mode)
    fn = LabelMean(model, "MG_FE")
    assert not any(m.training for m in model.model.modules())
    flux, extra = fn.inputs(X, ivar)
    with torch.no_grad():
        out = fn(flux, extra).double().numpy()
        base = fn(torch.zeros_like(flux), extra).double().numpy()
    pred, _ = model.predict(X, ivar)
    np.testing.assert_allclose(out, pred[:, 0], rtol=0, atol=1e-5)
    attr, delta, diff = integrated_gradients(fn, X, ivar, n_steps=64)
    np.testing.assert_allclose(diff, out - base, atol=1e-6)
    # completeness: the attributions add up to F(x) - F(flat continuum)
    total = attr.sum(axis=1)
    np.testing.assert_allclose(total, out - base, rtol=0, atol=1e-3 * np.abs(out - base).max() + 1e-6)
    np.testing.assert_allclose(delta, total - (out - base), atol=1e-6)
    assert np.abs(delta).max() < 1e-3 * np.abs(diff).max()
    assert np.all(attr[0, 100:120] == 0.0)  # no data -> continuum -> no attribution
    # too few steps violates completeness visibly more: the delta is a real measurement
    _, delta2, _ = integrated_gradients(fn, X, ivar, n_steps=2)
    assert np.abs(delta2).max() > np.abs(delta).max()


@pytest.mark.slow
def test_occlusion_measures_change_of_prediction(trained: tuple[LoadedModel, Dataset, Path]) -> None:
    model, test, _ = trained
    fn = LabelMean(model, "CA_FE")
    X, ivar = test.X[:2], test.ivar[:2]
    window = 7
    occ = occlusion(fn, X, ivar, window=window, stride=window)
    # with stride == window every pixel is covered by exactly one window: check one by hand
    Xo = X.copy()
    Xo[:, 140:147] = 1.0
    mean, _ = model.predict(X, ivar)
    mean_o, _ = model.predict(Xo, ivar)
    np.testing.assert_allclose(occ[:, 143], mean[:, 1] - mean_o[:, 1], atol=1e-5)


@pytest.mark.slow
def test_mg_and_ca_lines_rank_among_top_regions(
    trained: tuple[LoadedModel, Dataset, Path], tmp_path: Path
) -> None:
    model, test, _ = trained
    settings = ImportanceSettings(ig_steps=32, occlusion_per_batch=4, top_n_regions=8)
    own = {"MG_FE": ("Mg I",), "CA_FE": ("Ca II", "Ca I")}
    for lab in LABELS:
        res = run_feature_importance(model, test, lab, tmp_path, settings=settings, batch_size=32)
        regions = pd.read_csv(res.files["regions"])
        assert list(regions.columns) == ["rank", "wave_start", "wave_end", "importance", "lines"]
        assert len(regions) == 8 and regions["rank"].tolist() == list(range(1, 9))
        assert regions["importance"].is_monotonic_decreasing
        top3 = regions.head(3)["lines"].tolist()
        assert any(any(sp + " " in lines for sp in own[lab]) for lines in top3), (lab, top3)
        s = res.summary
        assert s["own_fraction"] > 2 * s["own_pixel_fraction"], s
        assert s["ig_relative_delta"] < 1e-3
        assert s["ig_occlusion_spearman"] > 0.5
        text = res.files["explanation"].read_text()
        assert "Verdict:" in text and "NIST ASD" in text and "Pearse & Gaydon" in text
        assert res.files["plot"].stat().st_size > 10_000
    # Mg and Ca do not share their top region: each model output reads its own element
    mg = pd.read_csv(tmp_path / "MG_FE_top_regions.csv").iloc[0]
    ca = pd.read_csv(tmp_path / "CA_FE_top_regions.csv").iloc[0]
    assert mg["wave_end"] < ca["wave_start"] or ca["wave_end"] < mg["wave_start"]


@pytest.mark.slow
def test_batch_tracking_resumes_after_interruption(
    trained: tuple[LoadedModel, Dataset, Path], tmp_path: Path
) -> None:
    model, test, _ = trained
    data = test.subset(np.arange(20))
    settings = ImportanceSettings(ig_steps=8, occlusion_per_batch=0)  # occlusion: tested above
    full = run_feature_importance(
        model, data, "MG_FE", tmp_path / "full", settings=settings, batch_size=8, save_batch_results=True
    )
    assert full.batches_run == [1, 2, 3]

    class Interrupt(Exception):
        pass

    def stop_after_two(k: int, row: dict) -> None:
        if k == 2:
            raise Interrupt

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_feature_importance(
            model, data, "MG_FE", out, settings=settings, batch_size=8, save_batch_results=True,
            on_batch=stop_after_two,
        )  # fmt: skip
    folder = out / "MG_FE_batch_results"
    assert pd.read_csv(folder / "batch_tracking.csv")["batch"].tolist() == [1, 2]
    assert not (out / "MG_FE_top_regions.csv").exists()
    res = run_feature_importance(
        model, data, "MG_FE", out, settings=settings, batch_size=8, save_batch_results=True
    )
    assert res.batches_skipped == [1, 2] and res.batches_run == [3]
    for k in (1, 2, 3):
        for suffix in ("feature_importance.png", "explanation.txt"):
            assert (folder / f"batch_{k}_{suffix}").exists()
    assert (folder / "MG_FE_batch_trends.png").exists()
    summary = (folder / "MG_FE_batch_summary.txt").read_text()
    assert "batches recorded: 3" in summary and "own_fraction" in summary
    a = np.load(tmp_path / "full" / "MG_FE_importance.npz")
    b = np.load(out / "MG_FE_importance.npz")
    np.testing.assert_allclose(a["importance"], b["importance"], rtol=1e-10)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "full" / "MG_FE_top_regions.csv"), pd.read_csv(out / "MG_FE_top_regions.csv")
    )
    # changing the batch size invalidates the old batches: a fresh run
    res2 = run_feature_importance(
        model, data, "MG_FE", out, settings=settings, batch_size=10, save_batch_results=True
    )
    assert res2.batches_run == [1, 2] and res2.batches_skipped == []
    assert not (folder / "batch_3_explanation.txt").exists()


@pytest.mark.slow
def test_residual_analysis_outputs_and_resume(
    trained: tuple[LoadedModel, Dataset, Path], tmp_path: Path
) -> None:
    model, test, _ = trained
    calls: list[int] = []

    def boom(k: int, row: dict) -> None:
        calls.append(k)
        if k == 1 and len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_residual_analysis(
            model, test, "CA_FE", tmp_path, batch_size=24, save_batch_results=True, on_batch=boom
        )
    res = run_residual_analysis(
        model, test, "CA_FE", tmp_path, batch_size=24, save_batch_results=True, on_batch=boom
    )
    assert res.batches_skipped == [1] and res.batches_run == [2, 3]
    folder = tmp_path / "CA_FE_batch_results"
    for k in (1, 2, 3):
        for suffix in ("residual_analysis.png", "residual_report.txt", "predictions.csv"):
            assert (folder / f"batch_{k}_{suffix}").exists()
    track = pd.read_csv(folder / "batch_tracking.csv")
    assert track["n"].tolist() == [24, 24, 16]
    df = pd.read_csv(res.files["predictions"])
    assert len(df) == 64
    mean, _ = model.predict(test.X, test.ivar)
    np.testing.assert_allclose(df["pred"], mean[:, 1], atol=1e-6)
    np.testing.assert_allclose(df["residual"], df["pred"] - df["true"], atol=1e-9)
    m = regression_metrics(df["true"], df["pred"])
    assert res.summary["rmse"] == pytest.approx(m["rmse"]) and res.summary["r2"] == pytest.approx(m["r2"])
    report = res.files["report"].read_text()
    for word in ("RMSE", "MAE", "bias", "robust scatter", "R2", "By SNR", "Teff", "logg"):
        assert word in report
    assert f"{m['rmse']:.5g}" in report
    assert (tmp_path / "CA_FE_residual_analysis.png").stat().st_size > 10_000
    with pytest.raises(DataMismatchError, match="no true values"):
        run_residual_analysis(model, replace(test.subset(np.arange(4)), y=test.y[:4, :1], elements=["MG_FE"]),
                              "CA_FE", tmp_path)  # fmt: skip


def test_explanation_own_lines_vs_other_species() -> None:
    assert element_of_label("MG_FE") == "MG" and element_of_label("fe_h") == "FE"
    assert element_of_label("TEFF") is None
    wl = GRID
    mask = own_line_mask(wl, "MG", 3.0)
    assert mask[np.argmin(np.abs(wl - 5174.1))] and not mask[np.argmin(np.abs(wl - 4500.0))]
    # importance on Mg b only -> own lines dominate
    imp = np.exp(-0.5 * ((wl - 5174.12) / 1.0) ** 2)
    e = explain_importance("MG_FE", wl, imp)
    assert e.own_fraction > 0.9 and "dominate" in e.verdict
    # importance on an Fe I line far from any Mg line -> other species
    fe = load_linelist(elements=["FE"])
    w_fe = float(fe.loc[(fe["wavelength"] > 4370) & (fe["wavelength"] < 4390), "wavelength"].iloc[0])
    e2 = explain_importance("MG_FE", wl, np.exp(-0.5 * ((wl - w_fe) / 1.0) ** 2))
    assert e2.own_fraction < 0.05 and "leans on lines of other species" in e2.verdict
    assert next(iter(e2.species_fractions)) == "Fe I"


def test_top_regions_ranks_and_names_lines() -> None:
    wl = GRID
    imp = 1.0 * np.exp(-0.5 * ((wl - 3934.77) / 1.5) ** 2) + 0.4 * np.exp(-0.5 * ((wl - 5174.12) / 1.5) ** 2)
    reg = top_regions(wl, imp, top_n=3)
    assert reg.iloc[0]["wave_start"] < 3934.77 < reg.iloc[0]["wave_end"]
    assert reg.iloc[0]["lines"].startswith("Ca II 3934.77")
    assert "Mg I 5174.12" in reg.iloc[1]["lines"]
    assert reg.iloc[0]["importance"] > reg.iloc[1]["importance"] > 0
    assert reg["importance"].sum() <= 1.0 + 1e-12


def test_attribution_stats_merge_is_exact() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(7, 30))
    s1, s2, s = AttributionStats(30), AttributionStats(30), AttributionStats(30)
    s1.add(a, np.zeros(5), np.ones(5))
    s2.add(b, np.zeros(7), np.ones(7))
    s.add(np.vstack([a, b]), np.zeros(12), np.ones(12))
    m = s1.merge(s2)
    np.testing.assert_allclose(m.importance, np.abs(np.vstack([a, b])).mean(axis=0))
    np.testing.assert_allclose(m.spread, np.abs(np.vstack([a, b])).std(axis=0))
    np.testing.assert_allclose(m.importance, s.importance)
    assert np.isnan(agreement(GRID[:30], m, ImportanceSettings())["ig_occlusion_spearman"])


@pytest.mark.slow
def test_analyze_cli(trained: tuple[LoadedModel, Dataset, Path], tmp_path: Path) -> None:
    _, test, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "models" / "mgca")
    (tmp_path / "processed_data").mkdir()
    save_dataset(tmp_path / "processed_data" / "test_dataset.npz", test)
    cfg = tmp_path / "analysis.toml"
    cfg.write_text("[analysis]\nocclusion_per_batch = 1\nocclusion_window = 30\nocclusion_stride = 30\n")
    runner = CliRunner()
    args = [
        "--workdir", str(tmp_path), "analyze", "--config", str(cfg), "--elements", "MG_FE", "CA_FE",
        "--type", "both",
        "--save-batch-results", "--analysis-batch-size", "8", "--max-spectra", "16", "--ig-steps", "8",
        "--device", "cpu",
    ]  # fmt: skip
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "MG_FE feature importance (16 spectra)" in res.output
    fi, ra = tmp_path / "results" / "feature_importance", tmp_path / "results" / "residual_analysis"
    for lab in LABELS:
        for name in ("feature_importance.png", "top_regions.csv", "explanation.txt"):
            assert (fi / f"{lab}_{name}").exists()
        for name in ("residual_analysis.png", "residual_report.txt", "predictions.csv"):
            assert (ra / f"{lab}_{name}").exists()
        assert pd.read_csv(fi / f"{lab}_batch_results" / "batch_tracking.csv")["batch"].tolist() == [1, 2]
        assert (ra / f"{lab}_batch_results" / f"{lab}_batch_summary.txt").exists()
    assert (fi / "resolved_config.toml").exists()
    again = runner.invoke(main, [a for a in args if a != "MG_FE"])  # CA_FE only
    assert again.exit_code == 0, again.output
    assert again.output.count("resumed: batches [1, 2] were already done") == 2  # both analyses of CA_FE
    assert "MG_FE" not in again.output
    bad = runner.invoke(main, ["--workdir", str(tmp_path), "analyze", "--elements", "C_FE"])
    assert bad.exit_code == 1 and "does not predict" in bad.output
    missing = runner.invoke(main, ["--workdir", str(tmp_path), "analyze", "--data-path", "nope.npz"])
    assert missing.exit_code == 1 and "no such dataset" in missing.output


def test_telluric_regions_are_named() -> None:
    from specabund.analysis.explain import telluric_note

    assert telluric_note(7585.0, 7600.0) == "telluric O2 A band?"
    assert telluric_note(6860.0, 6866.0) == "telluric O2 B band?"  # within the RV margin
    assert telluric_note(5160.0, 5190.0) == ""
