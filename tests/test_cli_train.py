"""``specabund train``, ``test`` and ``all`` end to end on a small simulated set (CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import simulated_workdir
from specabund.cli import main

FAST = ["--model-name", "rescnn_small", "--epochs", "2", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulated_workdir(tmp_path_factory.mktemp("work"), 80, seed=3)


def _invoke(work: Path, *args: str) -> str:
    r = CliRunner().invoke(main, ["--workdir", str(work), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_train_then_test(work: Path) -> None:
    out = _invoke(work, "train", "--elements", "c_fe", "MG_FE", *FAST, "--run-name", "run1")
    run = work / "models" / "run1"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["labels"] == ["C_FE", "MG_FE", "TEFF", "LOGG", "FE_H"]
    assert (run / "model.safetensors").exists() and (run / "resolved_config.toml").exists()
    assert "saved model" in out
    # the run carries what prediction needs: the preprocessing options and the training label range
    from specabund.predict.inputs import resolve_preprocess
    from specabund.training.saved import load_model

    assert resolve_preprocess(load_model(run))[2] == "config.json"
    lo, hi = np.array(cfg["label_range"]["min"]), np.array(cfg["label_range"]["max"])
    assert np.all(lo < hi)
    assert (work / "results" / "training_C_FE_MG_FE_batch_results" / "batch_tracking.csv").exists()

    out = _invoke(work, "test", "--model", "run1", "--data-path", "processed_data/test_dataset.npz")
    pred = pd.read_csv(work / "results" / "evaluation" / "predictions.csv")
    for col in ("spec", "snr", "C_FE_true", "C_FE_pred", "C_FE_err", "MG_FE_pred"):
        assert col in pred.columns
    n_test = len(np.load(work / "processed_data" / "test_dataset.npz")["X"])
    assert len(pred) == n_test
    assert "RMSE" in out
    comp = pd.read_csv(work / "results" / "baseline" / "comparison.csv")
    assert set(comp[comp["model"] == "cnn"]["element"]) == {"C_FE", "MG_FE"}


def test_unknown_element_is_a_clear_error(work: Path) -> None:
    r = CliRunner().invoke(main, ["--workdir", str(work), "train", "--elements", "XX_FE", *FAST])
    assert r.exit_code == 1
    assert "XX_FE" in r.output and "valid choices" in r.output and "C_FE" in r.output


def test_all_trains_and_tests(work: Path) -> None:
    out = _invoke(work, "all", "--elements", "CA_FE", *FAST, "--run-name", "run_all")
    assert (work / "models" / "run_all" / "model.safetensors").exists()
    assert "evaluated model run_all" in out


def test_train_twice_needs_overwrite(work: Path) -> None:
    args = ["train", "--elements", "MG_FE", *FAST, "--epochs", "1", "--run-name", "again"]
    _invoke(work, *args)
    first = (work / "models" / "again" / "model.safetensors").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["--workdir", str(work), *args])
    assert r.exit_code == 1 and "already holds a training run" in r.output
    _invoke(work, *args, "--overwrite")  # replaces the run (was ignored by `train` before)
    assert (work / "models" / "again" / "model.safetensors").stat().st_mtime_ns > first


def test_init_from_and_stellar_labels_only(work: Path) -> None:
    """--elements TEFF LOGG FE_H trains the parameters alone; --init-from fine-tunes from a parent run."""
    _invoke(work, "train", "--elements", "TEFF", "LOGG", "FE_H", *FAST, "--run-name", "params")
    cfg = json.loads((work / "models" / "params" / "config.json").read_text())
    assert cfg["labels"] == ["TEFF", "LOGG", "FE_H"]
    r = CliRunner().invoke(main, ["--workdir", str(work), "train", "--elements", "TEFF", *FAST,
                                  "--freeze-epochs", "1"])  # fmt: skip
    assert r.exit_code == 2 and "--init-from" in r.output
    _invoke(work, "train", "--elements", "MG_FE", *FAST, "--run-name", "child", "--init-from", "params",
            "--freeze-epochs", "1")  # fmt: skip
    child = json.loads((work / "models" / "child" / "config.json").read_text())
    assert child["init_from"]["labels"] == ["TEFF", "LOGG", "FE_H"]
    assert child["init_from"]["run_dir"].endswith("params") and child["train"]["freeze_epochs"] == 1
    assert child["labels"] == ["MG_FE", "TEFF", "LOGG", "FE_H"]
    # an ensemble of fine-tuned members: each starts from the same parent, with its own seed
    _invoke(work, "train", "--elements", "MG_FE", *FAST, "--run-name", "kids", "--init-from", "params",
            "--ensemble", "2")  # fmt: skip
    ens = json.loads((work / "models" / "kids" / "ensemble.json").read_text())
    assert ens["members"] == ["member_0", "member_1"] and ens["seeds"][1] == ens["seeds"][0] + 1
    parent_sha = child["init_from"]["weights_sha256"]
    for m in ens["members"]:
        member = json.loads((work / "models" / "kids" / m / "config.json").read_text())
        assert member["init_from"]["weights_sha256"] == parent_sha
    w = [load_file(work / "models" / "kids" / m / "model.safetensors") for m in ens["members"]]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_simulate_permuted_flag(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--workdir", str(tmp_path), "simulate", "--n", "6", "--output-dir", "p",
                                  "--permuted", "--prediction-fraction", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "permuted: True" in r.output
    r = CliRunner().invoke(main, ["--workdir", str(tmp_path), "simulate", "--n", "6", "--output-dir", "q",
                                  "--permuted", "--independent"])  # fmt: skip
    assert r.exit_code == 2 and "exclude" in r.output
