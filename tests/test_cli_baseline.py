"""``specabund baseline`` through the CLI: runs, resumes nothing twice, shows batch results."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from helpers import simulated_workdir
from specabund.cli import main


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulated_workdir(tmp_path_factory.mktemp("bl"), 120, seed=5)


def _invoke(work: Path, *args: str) -> str:
    r = CliRunner().invoke(main, ["--workdir", str(work), "baseline", *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_baseline_cli_batches_comparison_and_show(work: Path) -> None:
    out = _invoke(work, "--element", "mg_fe", "--model", "lightgbm", "--batch-size", "40", "--n-threads", "2")
    m = re.search(r"MG_FE  lightgbm: batches (\d+)/(\d+)", out)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 2, out
    n_batches = int(m.group(1))
    comp = pd.read_csv(work / "results" / "baseline" / "comparison.csv")
    assert list(comp.columns) == [
        "model",
        "element",
        "snr_bin",
        "n",
        "rmse",
        "robust_scatter",
        "bias",
        "r2",
        "rmse_ratio_labels_only",
    ]
    assert set(comp["model"]) == {"lightgbm"} and "all" in set(comp["snr_bin"])
    folder = work / "results" / "baseline_MG_FE_lightgbm_batch_results"
    assert (folder / "batch_tracking.csv").exists() and (folder / "MG_FE_lightgbm_batch_trends.png").exists()
    # a second call finds every batch done and trains nothing new
    out = _invoke(work, "--element", "MG_FE", "--model", "lightgbm", "--batch-size", "40")
    assert f"batches {n_batches}/{n_batches}" in out and "batch 1/" not in out
    assert len(pd.read_csv(folder / "batch_tracking.csv")) == n_batches
    shown = _invoke(work, "--element", "MG_FE", "--model", "lightgbm", "--show-batch-results")
    assert "lightgbm" in shown and "test_rmse" in shown
    shown = _invoke(work, "--element", "CA_FE", "--model", "xgboost", "--show-batch-results")
    assert "no baseline batch results" in shown


def test_baseline_cli_unknown_element(work: Path) -> None:
    r = CliRunner().invoke(
        main, ["--workdir", str(work), "baseline", "--element", "QQ_FE", "--model", "cannon"]
    )
    assert r.exit_code == 1 and "QQ_FE" in r.output and "valid choices" in r.output


def test_baseline_cli_cannon_settings_reach_the_model(work: Path) -> None:
    from specabund.baselines import CannonModel, load_baseline
    from specabund.config import read_toml

    out = _invoke(
        work, "--element", "MG_FE", "--model", "cannon", "--cannon-order", "2", "--cannon-regions", "1"
    )
    assert re.search(r"MG_FE +cannon: batches 1/1", out), out
    model = load_baseline(work / "results", "MG_FE", "cannon").model
    assert isinstance(model, CannonModel) and model.order == 2 and model.prior
    cfg = read_toml(work / "results" / "baseline" / "resolved_config.toml")
    assert cfg["baseline"]["cannon_order"] == 2 and cfg["baseline"]["cannon_regions"] == 1
    r = CliRunner().invoke(
        main, ["--workdir", str(work), "baseline", "--model", "cannon", "--cannon-order", "5"]
    )
    assert r.exit_code == 2 and "cannon-order" in r.output


def test_labels_only_baseline_and_ratio(work: Path) -> None:
    """The labels-only baseline (trees on catalogue Teff/logg/[Fe/H]) sets the ratio column of every model."""
    out = _invoke(work, "--element", "CA_FE", "--model", "labels_only", "--n-threads", "2")
    assert re.search(r"CA_FE labels_only: batches 1/1", out), out
    _invoke(work, "--element", "CA_FE", "--model", "xgboost", "--n-threads", "2")
    comp = pd.read_csv(work / "results" / "baseline" / "comparison.csv").set_index(
        ["model", "element", "snr_bin"]
    )
    lo = comp.loc[("labels_only", "CA_FE", "all")]
    xg = comp.loc[("xgboost", "CA_FE", "all")]
    assert lo["rmse_ratio_labels_only"] == pytest.approx(1.0)
    assert xg["rmse_ratio_labels_only"] == pytest.approx(xg["rmse"] / lo["rmse"])
    meta = (
        work / "results" / "baseline_CA_FE_labels_only_batch_results" / "models" / "batch_1.json"
    ).read_text()
    assert '"given"' in meta and '"lightgbm"' in meta
    shown = CliRunner().invoke(
        main, ["--workdir", str(work), "show-results", "--result-type", "baseline", "--elements", "CA_FE"]
    )
    assert shown.exit_code == 0 and "labels-only check" in shown.output, shown.output
