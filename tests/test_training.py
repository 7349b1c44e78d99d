"""Loss masking, augmentation, training, saved models, resume and compatibility checks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import noisy_dataset, saturating_lines, split_70_15_15
from specabund.dataset import Dataset
from specabund.errors import ConfigError, DataMismatchError
from specabund.models import default_config
from specabund.training import (
    AugmentConfig,
    Augmenter,
    LabelScaler,
    LoadedEnsemble,
    LoadedModel,
    TrainConfig,
    TrainResult,
    gaussian_nll,
    load_model,
    masked_mse,
    resolve_device,
    train,
    train_ensemble,
)
from specabund.training.data import C_KMS

LABELS = ["C_FE", "MG_FE", "FE_H"]


def make_synthetic(
    n: int = 400,
    n_pixels: int = 600,
    seed: int = 0,
    preprocess_hash: str = "synth-v1",
    missing_frac: float = 0.0,
) -> Dataset:
    """Spectra with Gaussian absorption lines whose optical depth grows exponentially with one of three
    labels (so line depths saturate), plus white noise at the spectrum's SNR (ivar = SNR**2)."""
    rng = np.random.default_rng(seed)
    wl = 4000.0 * 10 ** (1e-4 * np.arange(n_pixels))
    y = rng.normal(0.0, [0.2, 0.25, 0.4], size=(n, 3)).astype(np.float32)
    flux = saturating_lines(wl, y, 36)
    fe_h = y[:, 2].copy()
    if missing_frac:
        y[rng.random(y.shape) < missing_frac] = np.nan
    return noisy_dataset(
        flux,
        y,
        LABELS,
        wl,
        rng,
        snr_range=(30, 150),
        split=split_70_15_15(n),
        teff=rng.uniform(4000, 6500, n),
        logg=rng.uniform(1.0, 4.8, n),
        fe_h=fe_h,
        preprocess_hash=preprocess_hash,
    )


def small_config(**kw: object) -> TrainConfig:
    # no abundance swap: these toy spectra's "lines" are not the simulator's, so moving them along the
    # simulator's response would only relabel spectra at random (tests/test_swap.py covers the swap)
    base = {
        "epochs": 4,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "seed": 3,
        "num_threads": 1,
        "augment": {"swap_prob": 0.0},
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_synthetic(n=600, missing_frac=0.1)


@pytest.fixture(scope="module")
def trained(data: Dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult, Path]:
    run = tmp_path_factory.mktemp("run") / "model"
    plots = tmp_path_factory.mktemp("plots")
    res = train(
        data.split_subset("train"),
        data.split_subset("val"),
        LABELS,
        default_config("rescnn_small"),
        small_config(epochs=12, plot_every=4),
        run,
        plot_dir=plots,
    )
    return run, res, plots


# ---------------------------------------------------------------- loss


def test_masked_nll_ignores_missing_labels_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    mean0 = torch.randn(6, 3, generator=g)
    logvar0 = torch.randn(6, 3, generator=g)
    target = torch.randn(6, 3, generator=g)
    mask = torch.rand(6, 3, generator=g) < 0.4
    target[mask] = float("nan")
    for fn in (gaussian_nll, lambda m, v, t: masked_mse(m, t) + 0 * v.sum()):
        mean, logvar = mean0.clone().requires_grad_(), logvar0.clone().requires_grad_()
        loss = fn(mean, logvar, target)
        loss.backward()
        # reference: the same loss on the present entries only
        m_ref, v_ref = mean0.clone().requires_grad_(), logvar0.clone().requires_grad_()
        ok = ~mask
        if fn is gaussian_nll:
            ref = (0.5 * (v_ref[ok] + (target[ok] - m_ref[ok]) ** 2 * torch.exp(-v_ref[ok]))).mean()
        else:
            ref = ((target[ok] - m_ref[ok]) ** 2).mean() + 0 * v_ref.sum()
        ref.backward()
        assert torch.allclose(loss, ref)
        assert torch.allclose(mean.grad, m_ref.grad) and torch.allclose(logvar.grad, v_ref.grad)
        assert torch.all(mean.grad[mask] == 0) and torch.all(logvar.grad[mask] == 0)
        # changing the predictions where the label is missing changes nothing at all
        mean2 = mean0.clone()
        mean2[mask] = 1e6
        logvar2 = logvar0.clone()
        logvar2[mask] = -50.0
        mean2.requires_grad_()
        logvar2.requires_grad_()
        loss2 = fn(mean2, logvar2, target)
        loss2.backward()
        assert loss2.item() == loss.item()
        assert torch.equal(mean2.grad, mean.grad) and torch.equal(logvar2.grad, logvar.grad)


def test_masked_loss_gradients_do_not_depend_on_masked_values() -> None:
    """Any non-finite value (NaN, +-inf) marks a missing label with the same result."""
    mean = torch.tensor([[0.1, 0.5], [0.3, -0.2]], requires_grad=True)
    logvar = torch.tensor([[0.0, 0.2], [-0.5, 0.1]], requires_grad=True)
    base = torch.tensor([[0.0, float("nan")], [1.0, 0.4]])
    outs = []
    for missing in (float("nan"), float("inf"), -float("inf")):
        t = base.clone()
        t[0, 1] = missing
        mean.grad = logvar.grad = None
        loss = gaussian_nll(mean, logvar, t)
        loss.backward()
        outs.append((loss.item(), mean.grad.clone(), logvar.grad.clone()))
    for o in outs[1:]:
        assert o[0] == outs[0][0] and torch.equal(o[1], outs[0][1]) and torch.equal(o[2], outs[0][2])
    assert outs[0][1][0, 1] == 0 and outs[0][2][0, 1] == 0
    # all missing: zero loss, zero gradient
    mean.grad = logvar.grad = None
    loss = gaussian_nll(mean, logvar, torch.full((2, 2), float("nan")))
    loss.backward()
    assert loss.item() == 0.0 and mean.grad.abs().sum() == 0


def test_label_scaler_nan_aware() -> None:
    y = np.array([[1.0, np.nan], [3.0, 5.0], [np.nan, 5.0]])
    s = LabelScaler.fit(y, ["A", "B"])
    assert np.allclose(s.mean, [2.0, 5.0]) and np.allclose(s.std, [1.0, 1.0])  # zero spread -> 1
    assert np.allclose(s.inverse(s.transform(y)), y, equal_nan=True)
    with pytest.raises(DataMismatchError, match="no values"):
        LabelScaler.fit(np.array([[np.nan], [np.nan]]), ["A"])


# ---------------------------------------------------------------- augmentation


def _aug_batch(n: int = 400, p: int = 300) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    wl = 5000.0 * 10 ** (1e-4 * np.arange(p))
    flux = torch.ones(n, p) - 0.5 * torch.exp(-0.5 * ((torch.arange(p) - 150.0) / 3.0) ** 2)
    ivar = torch.full((n, p), 400.0)
    return wl, flux, ivar


def test_augmentation_off_is_identity_and_seeded() -> None:
    wl, flux, ivar = _aug_batch()
    off = Augmenter(AugmentConfig(noise_prob=0, rv_prob=0, continuum_prob=0), wl)
    f2, v2 = off(flux, ivar, torch.Generator().manual_seed(0))
    assert torch.equal(f2, flux) and torch.equal(v2, ivar)
    aug = Augmenter(AugmentConfig(), wl)
    a = aug(flux, ivar, torch.Generator().manual_seed(5))
    b = aug(flux, ivar, torch.Generator().manual_seed(5))
    c = aug(flux, ivar, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_noise_augmentation_matches_updated_ivar() -> None:
    wl, flux, ivar = _aug_batch()
    aug = Augmenter(AugmentConfig(noise_prob=1, rv_prob=0, continuum_prob=0, noise_max_factor=3.0), wl)
    f2, v2 = aug(flux, ivar, torch.Generator().manual_seed(1))
    factor2 = (ivar / v2)[:, 0]  # f**2 per spectrum
    assert torch.all(factor2 >= 1) and factor2.max() > 4
    added_var = ((f2 - flux) ** 2).mean(dim=1) * ivar[:, 0]  # in units of the original variance
    ok = factor2 > 1.5
    ratio = added_var[ok] / (factor2[ok] - 1)
    assert abs(float(ratio.mean()) - 1) < 0.05


def test_rv_augmentation_moves_line_by_doppler_shift() -> None:
    wl, flux, ivar = _aug_batch(n=200)
    cfg = AugmentConfig(noise_prob=0, rv_prob=1, continuum_prob=0, rv_max_kms=30.0)
    aug = Augmenter(cfg, wl)
    gen = torch.Generator().manual_seed(2)
    state = gen.get_state()
    f2, v2 = aug(flux, ivar, gen)
    gen.set_state(state)
    torch.rand(200, generator=gen)  # the "use" draws
    v = (torch.rand(200, generator=gen, dtype=torch.float64) * 2 - 1) * 30.0
    depth_ref, depth_new = 1 - flux, 1 - f2
    pix = torch.arange(flux.shape[1], dtype=torch.float32)
    c_ref = (depth_ref * pix).sum(1) / depth_ref.sum(1)
    c_new = (depth_new * pix).sum(1) / depth_new.sum(1)
    expected = torch.log10(1 + v / C_KMS) / 1e-4
    assert torch.allclose((c_new - c_ref).double(), expected, atol=0.02)
    assert float(expected.abs().max()) < 1.0  # sub-pixel shifts
    assert torch.all(v2 > 0) and torch.all(v2 >= ivar - 1e-3)  # interpolation averages noise down


def test_continuum_augmentation_keeps_snr() -> None:
    wl, flux, ivar = _aug_batch()
    aug = Augmenter(AugmentConfig(noise_prob=0, rv_prob=0, continuum_prob=1, continuum_tilt=0.05), wl)
    f2, v2 = aug(flux, ivar, torch.Generator().manual_seed(3))
    assert not torch.allclose(f2, flux)
    assert torch.allclose(f2**2 * v2, flux**2 * ivar, rtol=1e-4)
    # a tilt: the ratio is linear in wavelength
    ratio = (f2 / flux)[0].double().numpy()
    x = wl - wl[0]
    coef = np.polyfit(x, ratio, 1)
    assert np.allclose(np.polyval(coef, x), ratio, atol=1e-5)


# ---------------------------------------------------------------- training


def test_training_learns_and_writes_run_folder(trained: tuple, data: Dataset) -> None:
    run, res, plots = trained
    data_val = data.split_subset("val")
    std = np.nanstd(data_val.y, axis=0)
    for j, lab in enumerate(LABELS):
        assert res.final_metrics[lab]["rmse"] < 0.5 * std[j], (lab, res.final_metrics[lab], std[j])
    for f in ("model.safetensors", "config.json", "checkpoint.pt", "metrics.csv"):
        assert (run / f).is_file()
    hist = pd.read_csv(run / "metrics.csv")
    assert list(hist["epoch"]) == list(range(1, res.epochs_run + 1))
    for col in ("train_loss", "val_loss", "lr", "epoch_time_s", "memory_mb", "C_FE_mae", "FE_H_r2"):
        assert col in hist and hist[col].notna().all(), col
    assert hist["val_loss"].iloc[-1] < hist["val_loss"].iloc[0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["labels"] == LABELS and cfg["best_epoch"] == res.best_epoch
    assert cfg["preprocess_hash"] == "synth-v1" and cfg["wavelength"]["n"] == 600
    assert len(cfg["label_mean"]) == 3 and cfg["specabund_version"]
    assert cfg["best_val_loss"] == pytest.approx(hist["val_loss"].min())
    # per-epoch tracking and plots
    track = pd.read_csv(plots / "batch_tracking.csv")
    assert list(track["batch"]) == list(hist["epoch"])
    name = "_".join(LABELS)
    for f in (f"{name}_training_curves.png", f"{name}_pred_vs_true.png", f"{name}_batch_trends.png"):
        assert (plots / f).stat().st_size > 1000


def test_saved_model_round_trip(trained: tuple, data: Dataset, tmp_path: Path) -> None:
    run, res, _ = trained
    val = data.split_subset("val")
    model = load_model(run)
    assert isinstance(model, LoadedModel) and model.labels == LABELS
    mean, sigma = model.predict(val.X, val.ivar, batch_size=17)
    assert mean.shape == sigma.shape == (len(val), 3) and np.all(sigma > 0)
    # the loaded best weights reproduce the validation metrics recorded in training
    for j, lab in enumerate(LABELS):
        ok = np.isfinite(val.y[:, j])
        rmse = np.sqrt(np.mean((mean[ok, j] - val.y[ok, j]) ** 2))
        assert rmse == pytest.approx(res.final_metrics[lab]["rmse"], rel=1e-5)
    # copying the folder and loading again: identical predictions, also with another batch size
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("model.safetensors", "config.json"):
        (copy / f).write_bytes((run / f).read_bytes())
    mean2, sigma2 = load_model(copy).predict(val.X, val.ivar, batch_size=256)
    np.testing.assert_allclose(mean2, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-6, atol=1e-9)


def test_model_refuses_mismatched_data(trained: tuple) -> None:
    run, _, _ = trained
    model = load_model(run)
    good = make_synthetic(n=40, seed=9)
    model.check_compatible(good)
    other_hash = make_synthetic(n=40, seed=9, preprocess_hash="other")
    with pytest.raises(DataMismatchError, match="preprocess_hash"):
        model.check_compatible(other_hash)
    shifted = replace(good, wavelength=good.wavelength * 1.001)
    with pytest.raises(DataMismatchError, match="wavelength grid"):
        model.check_compatible(shifted)
    shorter = make_synthetic(n=40, n_pixels=500)
    with pytest.raises(DataMismatchError, match="500 pixels"):
        model.check_compatible(shorter)


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["epoch_time_s", "memory_mb"])


class _Killed(Exception):
    pass


def test_resume_equals_uninterrupted(data: Dataset, tmp_path: Path) -> None:
    tr, va = data.split_subset("train"), data.split_subset("val")
    mcfg = default_config("rescnn_small", dropout=0.1, head_dropout=0.1)  # exercise the global RNG
    tcfg = small_config(epochs=4, mse_warmup_epochs=1)
    before = torch.get_rng_state()
    full = train(tr, va, LABELS, mcfg, tcfg, tmp_path / "full")
    assert torch.equal(torch.get_rng_state(), before), "train() must not change the caller's global RNG"

    def kill(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train(tr, va, LABELS, mcfg, tcfg, tmp_path / "part", callbacks=[kill])
    assert not (tmp_path / "part" / "model.safetensors").exists()
    assert len(pd.read_csv(tmp_path / "part" / "metrics.csv")) == 2
    # a run folder in use is not silently overwritten
    with pytest.raises(ConfigError, match="resume=True"):
        train(tr, va, LABELS, mcfg, tcfg, tmp_path / "part")
    # resuming with another configuration is refused
    with pytest.raises(ConfigError, match="cannot resume"):
        train(tr, va, LABELS, mcfg, replace(tcfg, learning_rate=1e-2), tmp_path / "part", resume=True)
    resumed = train(tr, va, LABELS, mcfg, tcfg, tmp_path / "part", resume=True)
    assert resumed.epochs_run == full.epochs_run == 4
    assert resumed.best_epoch == full.best_epoch
    assert (tmp_path / "full" / "model.safetensors").read_bytes() == (
        tmp_path / "part" / "model.safetensors"
    ).read_bytes()
    pd.testing.assert_frame_equal(
        _comparable(pd.read_csv(tmp_path / "full" / "metrics.csv")),
        _comparable(pd.read_csv(tmp_path / "part" / "metrics.csv")),
        check_exact=True,
    )
    # resuming a finished run returns it unchanged
    again = train(tr, va, LABELS, mcfg, tcfg, tmp_path / "part", resume=True)
    assert again.best_epoch == full.best_epoch and again.epochs_run == 4


def test_early_stopping_and_callback_stop(data: Dataset, tmp_path: Path) -> None:
    tr, va = data.split_subset("train"), data.split_subset("val")
    # with a huge min_delta no epoch after the first counts as an improvement -> stop after 1 + patience
    cfg = small_config(epochs=30, early_stopping=2, min_delta=1e9)
    res = train(tr, va, LABELS, default_config("rescnn_small"), cfg, tmp_path / "es")
    assert res.stopped_early and res.best_epoch == 1 and res.epochs_run == 3
    res2 = train(
        tr,
        va,
        LABELS[:1],
        default_config("rescnn_small", in_channels=2),
        small_config(epochs=10, scheduler="plateau"),
        tmp_path / "cb",
        callbacks=[lambda epoch, row: epoch >= 2],
    )
    assert res2.epochs_run == 2 and res2.stopped_early
    assert load_model(tmp_path / "cb").labels == ["C_FE"]


def test_ensemble(data: Dataset, tmp_path: Path) -> None:
    tr, va = data.split_subset("train"), data.split_subset("val")
    results = train_ensemble(
        tr, va, LABELS, default_config("rescnn_small"), small_config(epochs=2), tmp_path / "ens", n_members=2
    )
    assert len(results) == 2
    ens = load_model(tmp_path / "ens")
    assert isinstance(ens, LoadedEnsemble) and len(ens.members) == 2
    m0, s0 = ens.members[0].predict(va.X, va.ivar)
    m1, s1 = ens.members[1].predict(va.X, va.ivar)
    assert not np.allclose(m0, m1)  # different seeds
    mean, sigma = ens.predict(va.X, va.ivar)
    np.testing.assert_allclose(mean, (m0 + m1) / 2, rtol=1e-6)
    assert np.all(sigma >= np.sqrt((s0**2 + s1**2) / 2) - 1e-9)


def test_train_rejects_bad_inputs(data: Dataset, tmp_path: Path) -> None:
    tr, va = data.split_subset("train"), data.split_subset("val")
    with pytest.raises(DataMismatchError, match="not in dataset labels"):
        train(tr, va, ["TI_FE"], default_config("rescnn_small"), small_config(), tmp_path / "a")
    with pytest.raises(DataMismatchError, match="preprocess_hash"):
        train(
            tr,
            replace(va, preprocess_hash="x"),
            LABELS,
            default_config("rescnn_small"),
            small_config(),
            tmp_path,
        )
    with pytest.raises(ConfigError):
        TrainConfig(scheduler="linear")
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"epochz": 3})
    cfg = TrainConfig.from_dict({**small_config().to_dict(), "augment": {"rv_prob": 0.2}})
    assert cfg.augment.rv_prob == 0.2 and TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")


# ---------------------------------------------------------------- fine-tuning from a parent run


def test_init_from_copies_trunk_new_head_and_freezes(
    data: Dataset, trained: tuple[Path, TrainResult, Path], tmp_path: Path
) -> None:
    parent_dir = trained[0]
    parent = load_model(parent_dir)
    assert isinstance(parent, LoadedModel)
    tr, va = data.split_subset("train"), data.split_subset("val")
    labels = ["MG_FE", "FE_H"]  # other labels than the parent's: a new output layer
    # every epoch frozen: the trunk (and its batch-norm statistics) must come out exactly as the parent's
    child = tmp_path / "child"
    train(tr, va, labels, default_config("rescnn"), small_config(epochs=2, freeze_epochs=2), child,
          init_from=parent_dir)  # fmt: skip
    got = load_model(child)
    assert isinstance(got, LoadedModel)
    assert got.model_config == parent.model_config  # the parent's architecture wins
    ps, cs = parent.model.state_dict(), got.model.state_dict()
    trunk = [k for k in ps if not k.startswith("head.")]
    assert trunk and all(torch.equal(ps[k], cs[k]) for k in trunk)
    assert cs["head.4.weight"].shape[0] == 2 * len(labels)
    cfg = json.loads((child / "config.json").read_text())
    assert cfg["init_from"]["labels"] == LABELS and cfg["init_from"]["freeze_epochs"] == 2
    assert cfg["labels"] == labels
    # the label standardisation is refitted on the new labels
    y = tr.y[:, [tr.elements.index(lab) for lab in labels]]
    np.testing.assert_allclose(cfg["label_mean"], np.nanmean(y, axis=0), rtol=1e-5)
    # after the frozen epochs the trunk trains too
    free = tmp_path / "free"
    train(tr, va, labels, default_config("rescnn"), small_config(epochs=2, freeze_epochs=1), free,
          init_from=parent_dir)  # fmt: skip
    fs = load_model(free).model.state_dict()
    assert any(not torch.equal(ps[k], fs[k]) for k in trunk if k.endswith("weight"))
    with pytest.raises(ConfigError, match="init_from"):
        train(tr, va, labels, default_config("rescnn_small"), small_config(freeze_epochs=1), tmp_path / "x")


def test_training_losses_fit_the_mean_and_keep_the_variance() -> None:
    """beta-NLL and the MSE-for-the-mean loss: masked like the NLL; the MSE loss's mean gradient does not
    depend on the predicted variance, while the NLL's is divided by it."""
    from specabund.training.loss import beta_nll, mse_detached_nll, training_loss

    t = torch.tensor([[1.0, float("nan")], [0.0, 2.0]])
    for lv0 in (-2.0, 3.0):
        mean = torch.zeros(2, 2, requires_grad=True)
        logvar = torch.full((2, 2), lv0, requires_grad=True)
        mse_detached_nll(mean, logvar, t).backward()
        assert mean.grad is not None and logvar.grad is not None
        np.testing.assert_allclose(mean.grad.numpy(), [[-2 / 3, 0.0], [0.0, -4 / 3]], rtol=1e-6)
        # the variance part is minimised at logvar = log(squared error)
        assert float(logvar.grad[0, 0]) == pytest.approx(0.5 * (1 - np.exp(-lv0)) / 3, rel=1e-5)
    mean = torch.zeros(2, 2, requires_grad=True)
    logvar = torch.full((2, 2), 3.0, requires_grad=True)
    gaussian_nll(mean, logvar, t).backward()
    assert mean.grad is not None
    assert float(mean.grad[0, 0]) == pytest.approx(-np.exp(-3.0) / 3, rel=1e-5)
    # beta = 1 gives the mean the squared-error gradient (up to the factor 1/2), whatever the variance
    mean = torch.zeros(2, 2, requires_grad=True)
    beta_nll(mean, torch.full((2, 2), 3.0), t, beta=1.0).backward()
    assert mean.grad is not None
    assert float(mean.grad[0, 0]) == pytest.approx(-1 / 3, rel=1e-5)
    assert float(training_loss("nll", torch.zeros(2, 2), torch.zeros(2, 2), t)) == pytest.approx(
        float(gaussian_nll(torch.zeros(2, 2), torch.zeros(2, 2), t))
    )
    with pytest.raises(ValueError):
        training_loss("l1", torch.zeros(2, 2), torch.zeros(2, 2), t)


def test_label_errors_add_to_the_predicted_variance(data: Dataset, tmp_path: Path) -> None:
    """sigma^2 = sigma_model^2 + sigma_label^2: a very noisy label barely pulls the mean; NaN = unknown."""
    t = torch.tensor([[1.0, 1.0]])
    lv = torch.zeros(1, 2)
    var = torch.tensor([[0.0, 3.0]])
    got = gaussian_nll(torch.zeros(1, 2), lv, t, label_var=var)
    want = (0.5 * (0.0 + 1.0) + 0.5 * (np.log(4.0) + 1.0 / 4.0)) / 2
    assert float(got) == pytest.approx(want, rel=1e-6)
    nan_var = torch.tensor([[float("nan"), float("nan")]])
    assert float(gaussian_nll(torch.zeros(1, 2), lv, t, label_var=nan_var)) == pytest.approx(
        float(gaussian_nll(torch.zeros(1, 2), lv, t))
    )
    mean = torch.zeros(1, 2, requires_grad=True)
    gaussian_nll(mean, lv, t, label_var=torch.tensor([[0.0, 1e4]])).backward()
    assert mean.grad is not None and abs(float(mean.grad[0, 1])) < 1e-3 * abs(float(mean.grad[0, 0]))
    # the trainer reads Dataset.y_err (hashed into the run, so a resume with other errors is refused)
    tr, va = data.split_subset("train"), data.split_subset("val")
    tr.y_err = np.full_like(tr.y, 0.05)
    res = train(tr, va, LABELS, default_config("rescnn_small"), small_config(epochs=1), tmp_path / "e")
    assert "train_label_err_hash" in json.loads((tmp_path / "e" / "config.json").read_text())
    assert res.epochs_run == 1
