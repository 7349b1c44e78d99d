"""Cramer-Rao bounds (evaluation.crb): scaling, marginalisation, Monte-Carlo check, masks, truth, table."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specabund.dataset import Dataset, load_dataset
from specabund.errors import ConfigError, DataMismatchError
from specabund.evaluation.crb import (
    _FrozenPipeline,
    cramer_rao_bounds,
    crb_details,
    fisher_matrix,
    information_limit_table,
    jacobian,
    load_truth,
    marginal_bounds,
    simulator_label,
)
from specabund.preprocess import PipelineSettings, PreprocessOptions, run_preprocess
from specabund.preprocess.steps import denoise, log_linear_grid, preprocess_spectrum
from specabund.simulate import LABEL_COLUMNS, draw_labels, normalized_model_flux, simulate_dataset

OPTS = PreprocessOptions()
GRID = log_linear_grid(OPTS.wave_min, OPTS.wave_max, OPTS.log_step)
SNR = 50.0


def _giant() -> dict[str, float]:
    """A cool, slightly metal-poor red giant with solar-scaled abundances."""
    return {"teff": 4500.0, "logg": 2.0, "fe_h": -0.3, **{c: 0.0 for c in LABEL_COLUMNS if c.endswith("_FE")}}


def _ivar(n: int = 1, snr: float = SNR, masked: bool = True) -> np.ndarray:
    iv = np.full((n, GRID.size), snr**2)
    if masked:
        iv[:, 100:110] = 0.0  # a bad column
        iv[:, -30:] = 0.0  # no sky at the red end
    return iv


@pytest.fixture(scope="module")
def giant_truth() -> pd.DataFrame:
    return pd.DataFrame([_giant()])


@pytest.fixture(scope="module")
def sample_truth() -> pd.DataFrame:
    return draw_labels(4, np.random.default_rng(11))


def test_simulator_label_spellings() -> None:
    assert simulator_label("TEFF") == "teff"
    assert simulator_label("[Fe/H]") == "fe_h"
    assert simulator_label("ca") == "CA_FE"
    assert simulator_label("mg_fe") == "MG_FE"
    with pytest.raises(ConfigError, match="not a simulator label"):
        simulator_label("SR_FE")


def test_bound_scales_as_one_over_snr(giant_truth: pd.DataFrame) -> None:
    labels = ["TEFF", "LOGG", "FE_H", "C_FE", "MG_FE", "CA_FE"]
    iv = _ivar()
    b1 = cramer_rao_bounds(giant_truth, iv, GRID, labels)
    b2 = cramer_rao_bounds(giant_truth, 2.0 * iv, GRID, labels)
    assert b1.shape == (1, len(labels))
    assert np.all(np.isfinite(b1)) and np.all(b1 > 0)
    np.testing.assert_allclose(b1 / b2, np.sqrt(2.0), rtol=1e-6)
    # and the values are physically sensible at SNR 50 for a cool giant: tens of K, ~0.1 dex logg,
    # a few hundredths of a dex for [Fe/H] and well-measured abundances
    teff, logg, feh, c, mg, ca = b1[0]
    assert 5.0 < teff < 100.0
    assert 0.02 < logg < 0.3
    assert 0.005 < feh < 0.1
    assert max(c, mg, ca) < 0.1


def test_strong_lines_give_smaller_bounds(giant_truth: pd.DataFrame) -> None:
    # Ca has the Ca II ca_line, H&K and strong Ca I lines; O only weak [O I] 6300 and the O I ca_line in a
    # cool giant; Ba a few Ba II lines
    ca, ba, o = cramer_rao_bounds(giant_truth, _ivar(), GRID, ["CA_FE", "BA_FE", "O_FE"])[0]
    assert ca < 0.5 * ba
    assert ca < 0.5 * o


def test_marginalising_never_beats_the_single_label_bound(sample_truth: pd.DataFrame) -> None:
    labels = list(LABEL_COLUMNS)
    res = crb_details(sample_truth, _ivar(len(sample_truth)), GRID, labels)
    assert not res.regularised.any()
    assert np.all(res.bounds >= res.single * (1.0 - 1e-9))
    # correlations are real: Teff is much worse once logg, [Fe/H] and the abundances are unknown
    assert np.all(res.bounds[:, 0] > 1.5 * res.single[:, 0])
    summary = res.summary()
    assert list(summary.columns[: len(labels)]) == labels
    assert {"teff_single", "condition", "regularised", "n_pixels"} <= set(summary.columns)
    assert (summary["n_pixels"] == GRID.size - 40).all()


def test_marginal_bounds_matches_explicit_inverse() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 4))
    f = a.T @ a
    m, s, cond, reg = marginal_bounds(f)
    np.testing.assert_allclose(m, np.sqrt(np.diag(np.linalg.inv(f))), rtol=1e-10)
    np.testing.assert_allclose(s, 1.0 / np.sqrt(np.diag(f)), rtol=1e-12)
    assert np.isfinite(cond) and not reg


def test_singular_fisher_is_regularised_and_flagged(giant_truth: pd.DataFrame) -> None:
    _, jac, _ = jacobian(_giant(), GRID)
    jac[:, LABEL_COLUMNS.index("NI_FE")] = 0.0  # a label the spectrum says nothing about
    f = fisher_matrix(jac, _ivar()[0])
    m, s, cond, reg = marginal_bounds(f, scales=np.array([20.0, 0.05] + [0.02] * (len(LABEL_COLUMNS) - 2)))
    assert reg and not np.isfinite(cond)
    k = LABEL_COLUMNS.index("NI_FE")
    assert np.isinf(s[k])
    np.testing.assert_allclose(m[k], 0.6, rtol=1e-3)  # the prior: width of the simulator's Ni range
    # the well-measured labels are barely touched by the weak prior (weakly measured ones, e.g. [O/Fe] at
    # ~0.4 dex against a prior of 1 dex, do shrink: that is the Bayesian bound)
    ref, *_ = marginal_bounds(fisher_matrix(np.delete(jac, k, axis=1), _ivar()[0]))
    well = ref < 0.15 * np.delete([1e4, 1.0] + [1.0] * (len(LABEL_COLUMNS) - 2), k)
    assert well.sum() >= 10
    np.testing.assert_allclose(np.delete(m, k)[well], ref[well], rtol=0.02)


def test_saturated_cn_bands_in_a_cool_giant_are_flagged(caplog: pytest.LogCaptureFixture) -> None:
    # the simulator's CN bands saturate fully in cool giants: the spectrum says nothing about [N/Fe]
    cool = pd.DataFrame([{**_giant(), "teff": 3950.0, "logg": 1.2, "fe_h": 0.0}])
    res = crb_details(cool, _ivar(), GRID, ["CA_FE", "N_FE"])
    assert res.regularised[0] and res.unconstrained == {0: ["N_FE"]}
    ca, n = res.bounds[0]
    assert ca < 0.05  # the other labels keep their information
    assert n == pytest.approx(1.3, rel=1e-3)  # N: the prior, the full width of the simulated range
    assert "requested labels affected: ['N_FE']" in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO, logger="specabund.evaluation.crb")
    crb_details(cool, _ivar(), GRID, ["CA_FE"])  # [N/Fe] not asked for: informed, not warned
    assert "no requested label is affected" in caplog.text
    assert all(r.levelno < logging.WARNING for r in caplog.records)


def test_masked_pixels_contribute_nothing(giant_truth: pd.DataFrame) -> None:
    labels = ["CA_FE", "MG_FE", "TEFF"]
    iv = _ivar(masked=False)
    ca_line = (GRID > 4200.0) & (GRID < 4250.0)  # the Ca I 4227 resonance line
    masked = iv.copy()
    masked[:, ca_line] = 0.0
    nan_masked = iv.copy()
    nan_masked[:, ca_line] = np.nan
    full = cramer_rao_bounds(giant_truth, iv, GRID, labels)[0]
    cut = cramer_rao_bounds(giant_truth, masked, GRID, labels)[0]
    np.testing.assert_array_equal(cramer_rao_bounds(giant_truth, nan_masked, GRID, labels)[0], cut)
    assert cut[0] > 1.15 * full[0]  # losing the line costs Ca information
    assert cut[1] < 1.05 * full[1]  # and barely any Mg information
    # identical to removing those pixels from the problem altogether
    _, jac, _ = jacobian(_giant(), GRID)
    keep = ~ca_line
    m, *_ = marginal_bounds(fisher_matrix(jac[keep], iv[0, keep]))
    idx = [LABEL_COLUMNS.index(simulator_label(lab)) for lab in labels]
    np.testing.assert_allclose(cut, m[idx], rtol=1e-9)
    # a star without any usable pixel gets no bound
    none = cramer_rao_bounds(giant_truth, np.zeros_like(iv), GRID, labels)
    assert np.isnan(none).all()


@pytest.mark.parametrize("mode", ["model", "pipeline"])
def test_derivatives_are_stable_against_the_step(giant_truth: pd.DataFrame, mode: str) -> None:
    labels = list(LABEL_COLUMNS)
    truth = giant_truth.assign(snr=SNR)
    ref = crb_details(truth, _ivar(), GRID, labels, mode)
    for scale in (0.5, 2.0):
        b = crb_details(truth, _ivar(), GRID, labels, mode, step_scale=scale).bounds
        np.testing.assert_allclose(b, ref.bounds, rtol=0.03)


def test_pipeline_and_model_bounds_agree_roughly(giant_truth: pd.DataFrame) -> None:
    labels = ["TEFF", "LOGG", "FE_H", "C_FE", "MG_FE", "CA_FE"]
    truth = giant_truth.assign(snr=SNR, ebv=0.1)
    model = cramer_rao_bounds(truth, _ivar(), GRID, labels, mode="model")
    pipe = cramer_rao_bounds(truth, _ivar(), GRID, labels, mode="pipeline")
    ratio = pipe / model
    assert np.all((ratio > 0.7) & (ratio < 1.5)), ratio
    assert not np.allclose(ratio, 1.0, atol=1e-3)  # the continuum normalisation does change them


def _gauss_newton(y: np.ndarray, w: np.ndarray, labels: dict[str, float], key: str, start: float) -> float:
    """Weighted least-squares fit of one label (the others fixed at their true values)."""
    theta = start
    h = 0.02 if key != "teff" else 20.0
    for _ in range(8):
        f = normalized_model_flux({**labels, key: theta}, GRID)
        d = (
            normalized_model_flux({**labels, key: theta + h}, GRID)
            - normalized_model_flux({**labels, key: theta - h}, GRID)
        ) / (2.0 * h)
        step = float(np.sum(w * d * (y - f)) / np.sum(w * d * d))
        theta += step
        if abs(step) < 1e-4 * h:
            break
    return theta


@pytest.mark.parametrize(("key", "offset"), [("CA_FE", 0.1), ("teff", 60.0)])
def test_monte_carlo_scatter_matches_the_unmarginalised_bound(key: str, offset: float) -> None:
    labels = _giant()
    iv = _ivar()[0]
    res = crb_details(pd.DataFrame([labels]), iv[None, :], GRID, [key])
    bound = float(res.single[0, 0])
    f0 = normalized_model_flux(labels, GRID)
    rng = np.random.default_rng(2024)
    good = iv > 0
    sigma = np.where(good, 1.0 / np.sqrt(np.where(good, iv, 1.0)), 0.0)
    est = []
    for _ in range(200):
        y = f0 + rng.normal(size=GRID.size) * sigma
        est.append(_gauss_newton(y, iv, labels, key, labels[key] + offset))
    est_arr = np.array(est)
    scatter = float(np.std(est_arr, ddof=1))
    assert abs(scatter / bound - 1.0) < 0.15, (scatter, bound)
    assert abs(float(np.mean(est_arr)) - labels[key]) < 4.0 * bound / np.sqrt(len(est))  # unbiased


def test_input_validation(giant_truth: pd.DataFrame) -> None:
    with pytest.raises(DataMismatchError, match="expected"):
        cramer_rao_bounds(giant_truth, np.ones((1, 10)), GRID, ["CA_FE"])
    with pytest.raises(DataMismatchError, match="rows"):
        cramer_rao_bounds(giant_truth, _ivar(2), GRID, ["CA_FE"])
    with pytest.raises(DataMismatchError, match="BA_FE"):
        cramer_rao_bounds(giant_truth.drop(columns="BA_FE"), _ivar(), GRID, ["CA_FE"])
    with pytest.raises(ConfigError, match="mode"):
        cramer_rao_bounds(giant_truth, _ivar(), GRID, ["CA_FE"], mode="exact")
    with pytest.raises(ConfigError, match="simulator label"):
        cramer_rao_bounds(giant_truth, _ivar(), GRID, ["SR_FE"])
    with pytest.raises(DataMismatchError, match="grid"):
        cramer_rao_bounds(giant_truth, _ivar()[:, :-1], GRID[:-1], ["CA_FE"], mode="pipeline")


def _dataset(specs: list[str]) -> Dataset:
    n = len(specs)
    return Dataset(
        X=np.ones((n, 3), dtype=np.float32),
        ivar=np.ones((n, 3), dtype=np.float32),
        wavelength=np.array([4000.0, 4001.0, 4002.0]),
        y=np.zeros((n, 1), dtype=np.float32),
        elements=["CA_FE"],
        filenames=np.array(specs),
        obsid=np.array([""] * n),
        spec=np.array(specs),
        teff=np.zeros(n, dtype=np.float32),
        logg=np.zeros(n, dtype=np.float32),
        fe_h=np.zeros(n, dtype=np.float32),
        snr=np.zeros(n, dtype=np.float32),
        split=np.zeros(n, dtype=np.int8),
        group=np.array([str(i) for i in range(n)]),
    )


def test_load_truth_aligns_and_reports_missing_rows(tmp_path: Path) -> None:
    truth = draw_labels(5, np.random.default_rng(1))
    truth.insert(0, "spec", [f"spec-{i}.fits" for i in range(5)])
    truth["snr"] = np.arange(5) * 10.0
    path = tmp_path / "truth.csv"
    truth.to_csv(path, index=False)
    ds = _dataset(
        ["spec-3.fits", "spec-0.fits.gz", "spec-4"]
    )  # any order, suffixes as the catalogue has them
    got = load_truth(path, ds)
    assert list(got["spec"]) == ["spec-3.fits", "spec-0.fits", "spec-4.fits"]
    np.testing.assert_allclose(got["teff"], truth["teff"].to_numpy()[[3, 0, 4]], rtol=1e-12)
    np.testing.assert_allclose(got["snr"], [30.0, 0.0, 40.0])
    with pytest.raises(DataMismatchError, match=r"1 of 2 dataset spectra have no truth row \(e.g. spec-9\)"):
        load_truth(path, _dataset(["spec-1.fits", "spec-9.fits"]))
    truth.drop(columns="MG_FE").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataMismatchError, match="MG_FE"):
        load_truth(tmp_path / "bad.csv", ds)
    with pytest.raises(DataMismatchError, match="not found"):
        load_truth(tmp_path / "nope.csv", ds)


def test_bounds_for_a_simulated_and_preprocessed_dataset(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    simulate_dataset(10, sim, seed=5, prediction_fraction=0.0, repeat_fraction=0.0)
    run_preprocess(
        fits_dir=sim / "fits",
        output_dir=tmp_path / "pre",
        reference_csv=sim / "X_FE.csv",
        settings=PipelineSettings(split_fractions=(0.0, 0.0, 1.0), elements=["C", "MG", "CA"]),
    )
    ds = load_dataset(tmp_path / "pre" / "test_dataset.npz")
    truth = load_truth(sim / "truth.csv", ds)
    labels = ds.elements
    np.testing.assert_allclose(truth["MG_FE"], ds.y[:, labels.index("MG_FE")], atol=1e-5)
    b = cramer_rao_bounds(truth, ds.ivar, ds.wavelength, labels)
    assert b.shape == (len(ds), len(labels)) and np.all(np.isfinite(b)) and np.all(b > 0)
    # the information falls with the noise: the noisiest spectrum has a larger [Mg/Fe] bound than the best
    j = labels.index("MG_FE")
    assert b[np.argmin(ds.snr), j] > b[np.argmax(ds.snr), j]
    bp = cramer_rao_bounds(truth.iloc[:2], ds.ivar[:2], ds.wavelength, labels, mode="pipeline")
    assert np.all(np.isfinite(bp)) and np.all((bp / b[:2] > 0.5) & (bp / b[:2] < 2.0))


def test_information_limit_table() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    snr = np.exp(rng.uniform(np.log(10.0), np.log(200.0), n))
    bounds = np.column_stack([2.0 / snr, 1.0 / snr])
    y_true = rng.normal(size=(n, 2))
    # an estimator 1.5x worse than the bound on label a, exactly at it on label b
    y_pred = y_true + rng.normal(size=(n, 2)) * bounds * np.array([1.5, 1.0])
    y_pred[0, 0] = np.nan
    tab = information_limit_table(y_true, y_pred, bounds, snr, ["A", "B"], snr_bins=(0, 50, np.inf))
    assert list(tab["snr_bin"]) == ["all", "<50", ">50", "all", "<50", ">50"]
    a = tab[tab["label"] == "A"].set_index("snr_bin")
    b = tab[tab["label"] == "B"].set_index("snr_bin")
    assert a.loc["all", "n"] == n - 1 and a.loc["<50", "n"] + a.loc[">50", "n"] == n - 1
    assert b.loc["all", "n"] == n
    np.testing.assert_allclose(a["z_rms"], 1.5, rtol=0.06)
    np.testing.assert_allclose(b["z_rms"], 1.0, rtol=0.06)
    for t in (a, b):
        np.testing.assert_allclose(t["ratio"], t["rmse"] / t["median_bound"])
        hi = t.loc[">50"]
        assert hi["median_bound"] < t.loc["<50", "median_bound"]
        col = 0 if t is a else 1
        sel = (snr >= 50) & np.isfinite(y_pred[:, col])
        assert hi["median_bound"] == pytest.approx(np.median(bounds[sel, col]))
    # in a narrow SNR bin, RMSE / median bound is close to the efficiency factor
    narrow = information_limit_table(y_true, y_pred, bounds, snr, ["A", "B"], snr_bins=(100, 110))
    ratios = narrow[narrow["snr_bin"] == "100-110"].set_index("label")["ratio"]
    assert ratios["A"] == pytest.approx(1.5, rel=0.2) and ratios["B"] == pytest.approx(1.0, rel=0.2)
    with pytest.raises(DataMismatchError):
        information_limit_table(y_true, y_pred[:, :1], bounds, snr, ["A", "B"])
    with pytest.raises(ConfigError):
        information_limit_table(y_true, y_pred, bounds, snr, ["A", "B"], snr_bins=(50, 10))


# ------------------------------------------------ the frozen pipeline is preprocess_spectrum, step by step


@pytest.mark.parametrize(
    ("star", "options"),
    [
        (0, PreprocessOptions()),
        (1, PreprocessOptions()),
        (2, PreprocessOptions(denoise=True)),
        (3, PreprocessOptions(second_pass=False)),
    ],
)
def test_frozen_pipeline_equals_preprocess_spectrum(
    sample_truth: pd.DataFrame, star: int, options: PreprocessOptions
) -> None:
    # at the true labels the frozen copy of the chain (mode='pipeline') must reproduce every stage of
    # preprocess_spectrum on the same noiseless simulated spectrum: cleaning, resampling, normalisation, masks
    labels = {c: float(sample_truth[c].iloc[star]) for c in LABEL_COLUMNS}
    grid = log_linear_grid(options.wave_min, options.wave_max, options.log_step)
    frozen = _FrozenPipeline(labels, grid, seed=star, snr_g=SNR, ebv=0.05, options=options)
    res = preprocess_spectrum(frozen._simulate(labels), options, rv_kms=0.0, keep_stages=True)
    assert res.ok
    stages = res.stages
    assert stages is not None
    # 1. clean: the same pixels keep their data
    np.testing.assert_array_equal(np.isfinite(stages["cleaned"][1]), frozen.ivar_obs > 0)
    # 2-4. (denoise), rest frame (rv 0) and resampling onto the grid
    flux = np.where(frozen.ivar_obs > 0, np.asarray(frozen._simulate(labels).flux, dtype=np.float64), 0.0)
    if options.denoise:
        flux, _ = denoise(flux, frozen.ivar_obs, options)
    rflux, rivar = frozen._resample(flux)
    np.testing.assert_array_equal(rivar > 0, np.isfinite(stages["rest_resampled"][1]))
    np.testing.assert_allclose(rflux[rivar > 0], stages["rest_resampled"][1][rivar > 0], rtol=1e-12)
    # 5. continuum (both passes) and normalisation, with the clipping decisions frozen
    nflux, good = frozen(labels)
    np.testing.assert_array_equal(good, res.ivar > 0)
    np.testing.assert_allclose(nflux[good], res.flux[good], rtol=2e-6, atol=2e-6)  # res.flux is float32
