"""Hyperparameter tuning: search space, batch rounds, interruption and resumption, concurrent workers,
the two chosen configurations and the report."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import specabund.cli.tune  # noqa: F401  (registers `specabund tune` on `main`)
from helpers import noisy_dataset, split_70_15_15
from specabund.cli import main
from specabund.config import load_config
from specabund.dataset import Dataset, save_dataset
from specabund.errors import ConfigError, SpecabundError
from specabund.models import ModelConfig
from specabund.simulate import draw_labels, lamost_wavelength_grid, normalized_model_flux
from specabund.training import TrainConfig, train
from specabund.tuning import (
    SearchSpace,
    TuneOptions,
    batch_partition,
    model_config_from_sections,
    open_study,
    round_batches,
    run_tuning,
    select_best,
    select_robust,
    train_config_from_sections,
    tuning_summary,
    write_report,
)
from specabund.workflows import build_configs

LABELS = ["C_FE", "MG_FE", "FE_H"]
SPACE = {
    "learning_rate": {"low": 1e-3, "high": 6e-3, "log": True},
    "batch_size": {"choices": [16, 32]},
    "group_width": {"choices": [4, 8]},
    "kernel_size": {"choices": [3, 5]},
    "dropout": {"low": 0.0, "high": 0.2},
    "augment_strength": {"low": 0.0, "high": 1.0},
}
USER_CONFIG = """
[model]
name = "rescnn_small"
[training]
device = "cpu"
early_stopping = 0
num_threads = 1
[tuning]
n_trials = 4
epochs_per_trial = 2
batch_size_hyperopt = 40
batches_per_round = 2
trials_per_round = 2
pruner_startup_trials = 2
pruner_warmup_epochs = 1
[tuning_space]
learning_rate = { low = 1e-3, high = 6e-3, log = true }
batch_size = { choices = [16, 32] }
group_width = { choices = [4, 8] }
kernel_size = { choices = [3, 5] }
dropout = { low = 0.0, high = 0.2 }
augment_strength = { low = 0.0, high = 1.0 }
weight_decay = false
blocks_per_group = false
stem_kernel_size = false
"""

# A worker process on the library API: `script data out storage n_trials mode [arg]`, mode `kill` (SIGKILL
# itself in epoch 1 of trial number `arg`) or `barrier` (start when file `arg` exists; slow epochs).
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from specabund.dataset import load_dataset
    from specabund.models import ModelConfig
    from specabund.training import TrainConfig
    from specabund.tuning import SearchSpace, TuneOptions, run_tuning

    data, out, storage, n_trials, mode = sys.argv[1:6]
    arg = sys.argv[6] if len(sys.argv) > 6 else ""
    ds = load_dataset(data)
    space = SearchSpace.from_config(json.loads(os.environ["TUNE_SPACE"]))
    opts = TuneOptions(n_trials=int(n_trials), epochs_per_trial=2, batch_size_hyperopt=40,
                       batches_per_round=2, trials_per_round=2, pruner="none", storage=storage,
                       study_name="t")
    hook = None
    if mode == "kill":
        def hook(trial, epoch, row):
            if trial.number == int(arg) and epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    else:
        Path(out, f"ready_{os.getpid()}").touch()
        while not Path(arg).exists():
            time.sleep(0.05)
        def hook(trial, epoch, row):
            time.sleep(0.25)
    run_tuning(ds.split_subset("train"), ds.split_subset("val"), ["C_FE", "MG_FE", "FE_H"], space,
               ModelConfig.from_dict({"name": "rescnn_small"}),
               TrainConfig(device="cpu", early_stopping=0, num_threads=1), opts, out, epoch_hook=hook)
    """
)


def make_dataset(n: int = 240, seed: int = 3) -> Dataset:
    """Noisy simulated spectra (the project's simulator) on a 1024-pixel slice of the LAMOST grid."""
    rng = np.random.default_rng(seed)
    lab = draw_labels(n, rng, independent=True)
    wl = lamost_wavelength_grid(start=1000, npix=1024)
    flux = np.array([normalized_model_flux(r, wl) for r in lab.to_dict("records")])
    y = lab[["C_FE", "MG_FE", "fe_h"]].to_numpy(np.float32)
    return noisy_dataset(
        flux,
        y,
        LABELS,
        wl,
        rng,
        snr_range=(40, 150),
        split=split_70_15_15(n),
        teff=lab["teff"].to_numpy(),
        logg=lab["logg"].to_numpy(),
        fe_h=y[:, 2],
        preprocess_hash="tune-test",
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    root = tmp_path_factory.mktemp("tune_ws")
    ds = make_dataset()
    path = root / "processed_data" / "reference_dataset.npz"
    path.parent.mkdir(parents=True)
    save_dataset(path, ds)
    return path, ds


def base_configs() -> tuple[ModelConfig, TrainConfig]:
    return ModelConfig.from_dict({"name": "rescnn_small"}), TrainConfig(
        device="cpu", early_stopping=0, num_threads=1
    )


def options(storage: Path, n_trials: int, **kw: object) -> TuneOptions:
    base: dict[str, object] = dict(
        n_trials=n_trials,
        epochs_per_trial=2,
        batch_size_hyperopt=40,
        batches_per_round=2,
        trials_per_round=2,
        pruner="none",
        storage=str(storage),
        study_name="t",
        worker_id=0,
    )
    base.update(kw)
    return TuneOptions(**base)  # type: ignore[arg-type]


def done_numbers(study: optuna.Study) -> list[int]:
    return sorted(t.number for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))


# ----------------------------------------------------------------------------------------------------------
# search space and batches


def test_space_maps_onto_training_library_and_rejects_bad_entries() -> None:
    space = SearchSpace.from_config(SPACE)
    model, tr = base_configs()
    params = {
        "learning_rate": 2e-3,
        "batch_size": 32,
        "group_width": 8,
        "kernel_size": 5,
        "dropout": 0.1,
        "augment_strength": 0.5,
    }
    m, t = space.apply(params, model, tr)
    assert m.group_channels == (8, 16, 24) and m.kernel_size == 5 and m.dropout == 0.1
    assert m.stem_channels == model.stem_channels  # untouched preset of rescnn_small
    assert t.learning_rate == 2e-3 and t.batch_size == 32
    assert t.augment.noise_max_factor == pytest.approx(1.5)  # 1 + 0.5 * (2 - 1)
    assert t.augment.rv_max_kms == pytest.approx(5.0)
    grid = space.grid(3)
    assert grid["learning_rate"][0] == pytest.approx(1e-3) and grid["learning_rate"][-1] == pytest.approx(
        6e-3
    )
    assert grid["batch_size"] == [16, 32] and space.grid_size(3) == 3 * 2 * 2 * 2 * 3 * 3

    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        SearchSpace.from_config({"lerning_rate": {"low": 1e-4, "high": 1e-2}})
    with pytest.raises(ConfigError, match="low < high"):
        SearchSpace.from_config({"dropout": {"low": 0.3, "high": 0.1}})
    with pytest.raises(ConfigError, match="log range needs low > 0"):
        SearchSpace.from_config({"weight_decay": {"low": 0.0, "high": 1e-3, "log": True}})
    with pytest.raises(ConfigError, match="kernel_size = 4 is not usable"):
        SearchSpace.from_config({"kernel_size": {"choices": [3, 4]}}).check(model, tr)
    # `false` drops a hyperparameter declared by the defaults
    assert SearchSpace.from_config({**SPACE, "weight_decay": False}).names == list(SPACE)


def test_default_config_space_is_valid() -> None:
    cfg = load_config()
    space = SearchSpace.from_config(cfg["tuning_space"], cfg["tuning"]["group_ratios"])
    space.check(model_config_from_sections(cfg), train_config_from_sections(cfg, device="cpu"))
    assert {"learning_rate", "batch_size", "dropout", "weight_decay", "kernel_size"} <= set(space.names)
    TuneOptions.from_config(cfg["tuning"])


def test_rounds_draw_fresh_batches() -> None:
    batches = batch_partition(250, 40, seed=1)
    assert [len(b) for b in batches] == [40] * 6 + [10]
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(250))
    assert np.array_equal(batches[0], batch_partition(250, 40, seed=1)[0])
    assert not np.array_equal(batches[0], batch_partition(250, 40, seed=2)[0])
    assert round_batches(7, 2, 0) == [0, 1]
    assert round_batches(7, 2, 1) == [2, 3]
    assert round_batches(7, 2, 3) == [6, 0]  # wraps around the partition
    assert round_batches(1, 2, 5) == [0]


def test_robust_rule_picks_smallest_model_within_one_se() -> None:
    def trial(value: float, n_params: int, se: float = 0.05) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            value=value,
            user_attrs={"n_params": n_params, "val_loss_se": se},
        )

    trials = [trial(1.00, 5000), trial(1.04, 800), trial(1.03, 1200), trial(1.2, 100)]
    assert select_best(trials) is trials[0]
    robust, threshold = select_robust(trials)
    assert robust is trials[1] and threshold == pytest.approx(1.05)
    trials[0].user_attrs["val_loss_se"] = 0.01  # tighter: only the best itself qualifies
    assert select_robust(trials)[0] is trials[0]


# ----------------------------------------------------------------------------------------------------------
# studies


def test_interrupted_study_resumes_without_repeating_trials(
    tmp_path: Path, data: tuple[Path, Dataset]
) -> None:
    _, ds = data
    tr, va = ds.split_subset("train"), ds.split_subset("val")
    space = SearchSpace.from_config(SPACE)
    model, base = base_configs()
    storage = tmp_path / "t.db"
    opts = options(storage, n_trials=4)

    def stop_after_two(study: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
        if len(done_numbers(study)) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tuning(tr, va, LABELS, space, model, base, opts, tmp_path, trial_callbacks=[stop_after_two])
    study, _ = open_study(opts, tmp_path)
    assert done_numbers(study) == [0, 1]
    first = {t.number: (t.datetime_complete, t.value, t.params) for t in study.get_trials()}

    # Ctrl-C inside trial 2's first epoch: the trial is failed, nothing counted
    def interrupt(trial: optuna.Trial, epoch: int, row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tuning(tr, va, LABELS, space, model, base, opts, tmp_path, epoch_hook=interrupt)
    study, _ = open_study(opts, tmp_path)
    assert study.trials[2].state == TrialState.FAIL and done_numbers(study) == [0, 1]

    res = run_tuning(tr, va, LABELS, space, model, base, opts, tmp_path)
    assert res.n_done == 4 and res.ran == [3, 4]
    study = res.study
    for num, (dt, value, params) in first.items():  # finished trials untouched
        t = study.trials[num]
        assert (t.datetime_complete, t.value, t.params) == (dt, value, params)
    assert len(study.trials) == 5
    t3 = study.trials[3]
    ua = t3.user_attrs
    assert ua["round"] == 1 and ua["batches"] == [2, 3] and ua["n_train"] == 80
    assert len(ua["val_loss_per_epoch"]) == 2 and ua["final_val_loss"] == pytest.approx(t3.value)
    assert min(ua["val_loss_per_epoch"]) == pytest.approx(t3.value)
    assert set(ua["rmse"]) == set(LABELS) and ua["n_params"] > 0 and ua["wall_time_s"] > 0
    assert ua["val_loss_se"] > 0 and sorted(t3.intermediate_values) == [1, 2]
    assert study.trials[0].user_attrs["round"] == 0 and study.trials[0].user_attrs["batches"] == [0, 1]

    again = run_tuning(tr, va, LABELS, space, model, base, opts, tmp_path)  # complete: nothing to run
    assert again.ran == [] and len(again.study.trials) == 5

    summary = write_report(again.study, tmp_path, storage="sqlite")
    assert summary["n_complete"] + summary["n_pruned"] == 4 and summary["n_fail"] == 1
    df = pd.read_csv(tmp_path / "trials.csv")
    assert len(df) == 5 and df.loc[df.state == "COMPLETE", "rmse_C_FE"].notna().all()
    for name in (
        "optimization_history.png",
        "parallel_coordinate.png",
        "param_importance.png",
        "summary.txt",
    ):
        assert (tmp_path / name).stat().st_size > 0
    assert summary["importance"] or "completed trials" in summary["importance_note"]


def test_trial_of_killed_process_is_failed_and_rerun(tmp_path: Path, data: tuple[Path, Dataset]) -> None:
    path, ds = data
    storage = tmp_path / "t.log"
    env = {**os.environ, "TUNE_SPACE": json.dumps(SPACE)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path), str(storage), "3", "kill", "1"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    opts = options(storage, n_trials=3, pruner="none")
    study, _ = open_study(opts, tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    t0_done = study.trials[0].datetime_complete

    model, base = base_configs()
    res = run_tuning(
        ds.split_subset("train"), ds.split_subset("val"), LABELS, SearchSpace.from_config(SPACE), model, base,
        opts, tmp_path,
    )  # fmt: skip
    assert res.failed_stale == [1]
    states = [t.state for t in res.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert res.study.trials[0].datetime_complete == t0_done and res.ran == [2, 3]


def test_two_processes_share_one_study(tmp_path: Path, data: tuple[Path, Dataset]) -> None:
    path, _ = data
    storage = tmp_path / "shared.log"
    env = {**os.environ, "TUNE_SPACE": json.dumps(SPACE)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    cmd = [sys.executable, str(script), str(path), str(tmp_path), str(storage), "5", "barrier", str(go)]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("ready_*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    study, _ = open_study(options(storage, n_trials=5), tmp_path)
    trials = study.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 5  # exactly n_trials between them
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    workers = {t.user_attrs["worker"]["pid"] for t in done}
    assert workers == {p.pid for p in procs}  # both did work


def test_pruned_trial_stops_early_and_counts(
    tmp_path: Path, data: tuple[Path, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ds = data
    seen: list[tuple[int, int]] = []
    real = optuna.trial.Trial.should_prune

    def should_prune(self: optuna.Trial) -> bool:
        seen.append((self.number, max(self.storage.get_trial(self._trial_id).intermediate_values)))
        return self.number == 1 or real(self)

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
    model, base = base_configs()
    opts = options(tmp_path / "t.db", n_trials=2, epochs_per_trial=3, pruner="median")
    res = run_tuning(
        ds.split_subset("train"), ds.split_subset("val"), LABELS, SearchSpace.from_config(SPACE), model, base,
        opts, tmp_path,
    )  # fmt: skip
    t0, t1 = res.study.trials
    assert t0.state == TrialState.COMPLETE and sorted(t0.intermediate_values) == [1, 2, 3]
    assert t1.state == TrialState.PRUNED and sorted(t1.intermediate_values) == [1]
    assert t1.user_attrs["pruned_at_epoch"] == 1 and len(t1.user_attrs["val_loss_per_epoch"]) == 1
    assert (0, 3) in seen and (1, 1) in seen  # asked once per reported epoch
    assert res.n_done == 2 and res.ran == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# command line, written configurations, summary


def test_cli_tune_writes_configs_that_load_and_train(tmp_path: Path, data: tuple[Path, Dataset]) -> None:
    path, ds = data
    user = tmp_path / "user.toml"
    user.write_text(USER_CONFIG)
    args = ["--workdir", str(tmp_path), "tune", "--data-path", str(path), "--elements", "C_FE", "MG_FE"]
    args += ["--config", str(user), "--n-trials", "4", "--method", "random", "--worker-id", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "results" / "hyperopt"
    assert (out / "specabund.db").exists()
    assert "best (lowest validation loss)" in res.output

    summary = tuning_summary(tmp_path / "results")
    assert summary["n_complete"] + summary["n_pruned"] == 4 and summary["labels"] == ["C_FE", "MG_FE", "FE_H"]
    assert len(summary["trials"]) == 4 and "robust" in summary["text"]
    assert {"best_params.toml", "robust_params.toml", "trials.csv", "summary.txt"} <= set(summary["files"])
    assert all((out / f).exists() for f in summary["files"])
    best_value = min(r["value"] for r in summary["trials"] if r["state"] == "COMPLETE")
    assert summary["best"]["value"] == pytest.approx(best_value)
    assert summary["robust"]["value"] <= summary["robust_threshold"] + 1e-12

    best_text = (out / "best_params.toml").read_text()
    assert (
        best_text.startswith("# specabund tune")
        and "one-standard-error" in (out / "robust_params.toml").read_text()
    )
    for name in ("best_params.toml", "robust_params.toml"):
        cfg = load_config(out / name)
        assert cfg["model"]["name"] == "rescnn_small"
        mcfg = model_config_from_sections(cfg)
        tcfg = train_config_from_sections(cfg, device="cpu", epochs=1)
        lead_m, lead_t, _ = build_configs(cfg, "cpu")  # what `specabund train --config` builds
        assert (
            lead_m == mcfg and lead_t.augment == tcfg.augment and lead_t.learning_rate == tcfg.learning_rate
        )
        key = "best" if name.startswith("best") else "robust"
        params = summary[key]["params"]
        assert mcfg.group_channels == (
            params["group_width"],
            2 * params["group_width"],
            3 * params["group_width"],
        )
        assert (
            tcfg.learning_rate == pytest.approx(params["learning_rate"])
            and tcfg.batch_size == params["batch_size"]
        )
        assert tcfg.augment.rv_max_kms == pytest.approx(10.0 * params["augment_strength"])
        r = train(
            ds.split_subset("train"), ds.split_subset("val"), ["C_FE"], mcfg, tcfg, tmp_path / f"run_{key}"
        )
        assert math.isfinite(r.best_val_loss)

    # rerunning resumes: nothing left to run, nothing repeated
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 0, res2.output
    assert len(pd.read_csv(out / "trials.csv")) == 4


def test_tuning_summary_without_results(tmp_path: Path) -> None:
    with pytest.raises(SpecabundError, match="no tuning results"):
        tuning_summary(tmp_path)


def test_storage_errors_become_one_line(tmp_path: Path) -> None:
    import sqlite3

    import sqlalchemy.exc

    from specabund.tuning import StorageError
    from specabund.tuning.storage import storage_errors

    cause = sqlite3.OperationalError("database or disk is full")
    with pytest.raises(StorageError) as info, storage_errors("sqlite:///x/specabund.db"):
        raise sqlalchemy.exc.OperationalError("INSERT INTO trials ...\n[long SQL]", {}, cause)
    assert isinstance(info.value, SpecabundError)
    assert str(info.value) == "tuning storage sqlite:///x/specabund.db: database or disk is full"


def test_read_toml_not_utf8_is_config_error(tmp_path: Path) -> None:
    from specabund.config import read_toml

    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "M\xe9lanie"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        read_toml(bad)
