"""``specabund show-results`` for every stage and ``specabund report``.

The folders of the other stages are written here with :class:`~specabund.tracking.BatchTracker` in the
layouts those stages use; the analysis results come from real (small) analysis runs of an untrained
network.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure

from specabund.analysis import ImportanceSettings, run_feature_importance, run_residual_analysis
from specabund.analysis.show import STAGES, collect_results, label_matches, render_json, render_text
from specabund.cli import analyze as _analyze_cli  # noqa: F401  (registers the commands)
from specabund.cli import main
from specabund.dataset import Dataset
from specabund.models import build_model, default_config
from specabund.plotting import save_figure
from specabund.tracking import BatchTracker
from specabund.training import LabelScaler, LoadedModel


def _png(path: Path, text: str = "x") -> Path:
    fig = Figure(figsize=(2, 1.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=40)


def _tracker(folder: Path, name: str, rows: list[dict]) -> BatchTracker:
    tr = BatchTracker(folder, name)
    for k, row in enumerate(rows, start=1):
        tr.record(k, row)
    tr.finalize()
    return tr


def _random_model(n_pixels: int, tmp: Path) -> LoadedModel:
    cfg = default_config("rescnn_small")
    net = build_model(cfg, n_pixels, 1).eval()
    return LoadedModel(
        model=net,
        run_dir=tmp,
        config={"wavelength": {"n": n_pixels}, "labels": ["C_FE"]},
        labels=["C_FE"],
        scaler=LabelScaler(mean=np.array([0.0]), std=np.array([0.2])),
        model_config=cfg,
    )


def _dataset(n: int, wl: np.ndarray, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    names = np.array([f"s{i}" for i in range(n)])
    y = rng.normal(0, 0.2, (n, 1)).astype(np.float32)
    return Dataset(
        X=(1 - 0.3 * rng.random((n, wl.size))).astype(np.float32),
        ivar=np.full((n, wl.size), 1e4, np.float32),
        wavelength=wl,
        y=y,
        elements=["C_FE"],
        filenames=names,
        obsid=names,
        spec=names,
        teff=rng.uniform(4000, 6500, n).astype(np.float32),
        logg=rng.uniform(1, 4.8, n).astype(np.float32),
        fe_h=rng.uniform(-1, 0.3, n).astype(np.float32),
        snr=rng.uniform(10, 200, n).astype(np.float32),
        split=np.full(n, 2, np.int8),
        group=names,
        preprocess_hash="h",
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose results/ holds the outputs of every stage."""
    root = tmp_path_factory.mktemp("ws")
    res = root / "results"
    # training: one row per epoch
    folder = res / "training_C_FE_MG_FE_batch_results"
    rows = [
        {"train_loss": 1.0 - 0.2 * k, "val_loss": 1.1 - 0.2 * k, "C_FE_rmse": 0.2 - 0.03 * k}
        for k in range(3)
    ]
    _tracker(folder, "C_FE_MG_FE", rows)
    _png(folder / "C_FE_MG_FE_training_curves.png")
    _png(folder / "C_FE_MG_FE_pred_vs_true.png")
    # evaluation
    ev = res / "evaluation"
    ev.mkdir(parents=True)
    pd.DataFrame({"label": ["C_FE", "MG_FE"], "rmse": [0.071, 0.052], "n": [100, 100]}).to_csv(
        ev / "metrics.csv", index=False
    )
    _png(ev / "C_FE_one_to_one.png")
    _tracker(
        res / "evaluation_C_FE_batch_results",
        "C_FE",
        [{"rmse": 0.07, "bias": 0.01}, {"rmse": 0.072, "bias": 0.0}],
    )
    # prediction
    (res / "predictions").mkdir()
    pd.DataFrame({"spec": ["a"], "C_FE": [0.1]}).to_csv(
        res / "predictions" / "C_FE_predictions.csv", index=False
    )
    _tracker(res / "prediction_C_FE_batch_results", "C_FE", [{"n": 100, "mean_sigma": 0.05}])
    # baseline
    (res / "baseline").mkdir()
    pd.DataFrame({"element": ["C_FE", "C_FE"], "model": ["xgboost", "cnn"], "rmse": [0.09, 0.07]}).to_csv(
        res / "baseline" / "comparison.csv", index=False
    )
    _png(res / "baseline" / "comparison.png")
    bfold = res / "baseline_C_FE_xgboost_batch_results"
    _tracker(bfold, "C_FE_xgboost", [{"val_rmse": 0.1}, {"val_rmse": 0.09}])
    _png(bfold / "batch_1" / "one_to_one.png")
    # tuning (fallback files: no summary.json of the tuning report)
    hy = res / "hyperopt"
    hy.mkdir()
    pd.DataFrame({"number": [0, 1], "value": [0.31, 0.27], "lr": [1e-3, 3e-4]}).to_csv(
        hy / "trials.csv", index=False
    )
    (hy / "summary.txt").write_text("best trial 1: value 0.27\n")
    # analysis: real runs of an untrained network
    wl = 10 ** np.arange(np.log10(5000.0), np.log10(5400.0), 2e-4)
    model = _random_model(wl.size, root)
    ds = _dataset(12, wl)
    st = ImportanceSettings(
        ig_steps=4, occlusion_per_batch=1, occlusion_window=20, occlusion_stride=20, top_n_regions=3
    )
    run_feature_importance(model, ds, "C_FE", res / "feature_importance", settings=st, batch_size=6,
                           save_batch_results=True)  # fmt: skip
    run_residual_analysis(model, ds, "C_FE", res / "residual_analysis", batch_size=6, save_batch_results=True)
    return root


def _show(root: Path, *args: str) -> str:
    r = CliRunner().invoke(main, ["--workdir", str(root), "show-results", *args])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("stage", STAGES)
def test_no_results_yet_names_the_command(stage: str, tmp_path: Path) -> None:
    out = _show(tmp_path, "--result-type", stage, "--elements", "C_FE")
    assert "No " in out and "results yet" in out
    cmd = {
        "training": "specabund train",
        "evaluation": "specabund test",
        "prediction": "specabund predict",
        "analysis": "specabund analyze --elements C_FE",
        "tuning": "specabund tune",
        "baseline": "specabund baseline --element C_FE",
    }[stage]
    assert cmd in out
    js = json.loads(_show(tmp_path, "--result-type", stage, "--format", "json"))
    assert js["found"] is False and js["command"].startswith("specabund ")


def test_label_matching_is_on_whole_labels() -> None:
    assert label_matches("C_FE_MG_FE", ["MG_FE"]) and label_matches("C_FE_xgboost", ["C_FE"])
    assert not label_matches("SC_FE", ["C_FE"]) and not label_matches("C_FE_MG_FE", ["FE_H"])


def test_training_table_trends_and_plots(workdir: Path) -> None:
    out = _show(workdir, "--result-type", "training", "--elements", "MG_FE")
    assert "C_FE_MG_FE: 3 batches" in out
    assert "val_loss" in out and "0.7" in out  # epoch 3: val_loss = 1.1 - 0.4
    assert "batches recorded: 3" in out
    assert "C_FE_MG_FE_batch_trends.png" in out and "C_FE_MG_FE_training_curves.png" in out
    js = json.loads(_show(workdir, "--result-type", "training", "--format", "json"))
    (b,) = js["batch_results"]
    assert b["n_batches"] == 3 and [r["batch"] for r in b["rows"]] == [1, 2, 3]
    assert b["rows"][2]["val_loss"] == pytest.approx(0.7)
    assert Path(b["trend_plot"]).exists()
    assert "No training results yet for SC_FE" in _show(
        workdir, "--result-type", "training", "--elements", "SC_FE"
    )


def test_evaluation_prediction_baseline_tuning(workdir: Path) -> None:
    out = _show(workdir, "--result-type", "evaluation", "--elements", "C_FE")
    assert "0.071" in out and "0.052" not in out  # metrics.csv filtered to the label
    assert "C_FE: 2 batches" in out and "C_FE_one_to_one.png" in out
    out = _show(workdir, "--result-type", "prediction")
    assert "mean_sigma" in out and "C_FE_predictions.csv" in out
    out = _show(workdir, "--result-type", "baseline", "--elements", "C_FE")
    assert "C_FE_xgboost: 2 batches" in out and "model comparison" in out and "xgboost" in out
    assert "batch_1/one_to_one.png" in out
    out = _show(workdir, "--result-type", "tuning")
    assert "best trial 1: value 0.27" in out and "0.31" in out
    js = json.loads(_show(workdir, "--result-type", "tuning", "--format", "json"))
    assert js["found"] and js["sections"][0]["table"][1]["value"] == pytest.approx(0.27)


def test_analysis_results(workdir: Path) -> None:
    out = _show(workdir, "--result-type", "analysis", "--analysis-type", "feature_importance")
    assert "feature_importance/C_FE: 2 batches" in out and "own_fraction" in out
    assert "feature importance: C_FE" in out and "C_FE_top_regions.csv" in out
    assert "residual" not in out.lower().replace("residual_analysis", "")
    out = _show(
        workdir, "--result-type", "analysis", "--analysis-type", "residual_analysis", "--elements", "C_FE"
    )
    assert "residual_analysis/C_FE: 2 batches" in out and "rmse" in out
    rmse = json.loads((workdir / "results" / "residual_analysis" / "C_FE_residual_summary.json").read_text())[
        "rmse"
    ]
    assert f"{rmse:.4g}" in out
    found = collect_results(workdir / "results", "analysis")
    assert {b.name for b in found.batches} == {"feature_importance/C_FE", "residual_analysis/C_FE"}
    assert render_text(found).startswith("== analysis results")
    js = render_json(found)
    json.dumps(js, allow_nan=False)  # NaN become null
    fi = next(b for b in js["batch_results"] if b["name"] == "feature_importance/C_FE")
    assert any(p.endswith("batch_1_feature_importance.png") for p in fi["plots"])


def test_report_embeds_images_and_omits_missing_stages(workdir: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--workdir", str(tmp_path), "report"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "results" / "report.html").read_text()
    assert page.count("Not run yet") >= 7 and "data:image/png" not in page
    r = CliRunner().invoke(main, ["--workdir", str(workdir), "report"])
    assert r.exit_code == 0, r.output
    page = (workdir / "results" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 8
    assert all(base64.b64decode(im)[:8] == b"\x89PNG\r\n\x1a\n" for im in images)
    for title in ("Training", "Evaluation", "Feature importance", "Residual analysis", "Baselines", "tuning"):
        assert title in page
    assert "Not run yet" not in page
    assert "<table>" in page and "0.071" in page
    assert 'src="' not in page.replace('src="data:image/png;base64,', "")  # nothing linked from outside
