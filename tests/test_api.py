"""The Python interface: the README example runs, and it gives what the commands give."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import specabund
from specabund.cli import main

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ["--mc-samples", "5", "--no-plots", "--device", "cpu"]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Python\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README: no python example in the Python section"
    return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """Run the README's Python example in a fresh folder; return the folder and its variables."""
    root = tmp_path_factory.mktemp("api")
    old = Path.cwd()
    os.chdir(root)
    try:
        scope: dict[str, object] = {"__name__": "readme_example"}
        exec(compile(readme_example(), "README.md", "exec"), scope)
    finally:
        os.chdir(old)
    return root, scope


def test_import_is_light_and_exports_the_api() -> None:
    code = "import sys, specabund; print('torch' in sys.modules, 'pandas' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]
    for name in ("read_lamost", "preprocess_spectrum", "load_model", "train", "evaluate", "simulate"):
        assert callable(getattr(specabund, name)) and name in specabund.__all__
    with pytest.raises(AttributeError):
        specabund.no_such_function  # noqa: B018
    # the subpackages of the same names stay importable, and calling them calls the API
    import importlib

    for mod in ("specabund.predict.catalogue", "specabund.preprocess.options", "specabund.simulate.synth"):
        importlib.import_module(mod)
    for name in ("simulate", "preprocess", "predict"):
        assert callable(getattr(specabund, name)), name
    assert specabund.preprocess.options.PreprocessOptions().wave_min > 0


def test_readme_example_predicts_the_catalogue(example: tuple[Path, dict[str, object]]) -> None:
    root, scope = example
    run = scope["run"]
    model = scope["model"]
    table = scope["table"]
    assert isinstance(table, pd.DataFrame)
    n_fits = len(list((root / "demo" / "fits").rglob("*.fits*")))
    assert len(table) == n_fits
    assert run.run_dir.parent == root / "demo" / "models"  # type: ignore[attr-defined]
    assert model.labels == ["MG_FE", "TEFF", "LOGG", "FE_H"]  # type: ignore[attr-defined]
    ok = table["flag"] & 1 == 0
    assert ok.sum() > 0.8 * n_fits
    assert np.isfinite(table.loc[ok, ["MG_FE", "MG_FE_err", "TEFF"]].to_numpy()).all()
    metrics = scope["metrics"]
    assert np.isfinite(metrics["MG_FE"]["all"]["rmse"])  # type: ignore[index]
    assert (root / "demo" / "results" / "evaluation" / "metrics.csv").exists()


def test_predict_equals_the_command(example: tuple[Path, dict[str, object]]) -> None:
    """``Model.predict`` gives the rows and columns ``specabund predict`` writes to predictions.csv."""
    root, scope = example
    work = root / "demo"
    run_dir = scope["run"].run_dir  # type: ignore[attr-defined]
    data = work / "processed_data" / "prediction_dataset.npz"
    r = CliRunner().invoke(
        main,
        ["--workdir", str(work), "predict", "--data-path", str(data), "--model", str(run_dir), *PREDICT],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    cli = pd.read_csv(work / "results" / "predictions" / "predictions.csv", keep_default_na=False)
    api = specabund.load_model(run_dir).predict(data, mc_samples=5)
    assert list(api.columns) == list(cli.columns)
    assert list(api["spec"]) == list(cli["spec"].astype(str))
    np.testing.assert_allclose(api["MG_FE"], cli["MG_FE"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(api["MG_FE_err"], cli["MG_FE_err"], rtol=1e-5, atol=1e-6)
    assert (api["flag"].to_numpy() == cli["flag"].to_numpy()).all()
    raw = specabund.load_model(run_dir).predict(data, mc_samples=5, calibrated=False)
    assert list(raw.columns) == list(api.columns)


def test_paths_are_honoured_by_train_and_test(example: tuple[Path, dict[str, object]]) -> None:
    root, _ = example
    work = root / "demo"
    cfg = work / "paths.toml"
    cfg.write_text('[paths]\nmodels_dir = "runs"\nresults_dir = "out"\n', encoding="utf-8")
    fast = ["--model-name", "rescnn_small", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    r = CliRunner().invoke(
        main,
        [
            "--workdir",
            str(work),
            "train",
            "--elements",
            "MG_FE",
            *fast,
            "--run-name",
            "p1",
            "--config",
            str(cfg),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert (work / "runs" / "p1" / "config.json").exists() and not (work / "models" / "p1").exists()
    assert (work / "out" / "training_MG_FE_batch_results" / "batch_tracking.csv").exists()
    r = CliRunner().invoke(
        main, ["--workdir", str(work), "test", "--model", "p1", "--config", str(cfg)], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert (work / "out" / "evaluation" / "predictions.csv").exists()
    assert (work / "out" / "evaluation_MG_FE_batch_results" / "batch_tracking.csv").exists()
    out = specabund.evaluate("p1", workdir=work, config=cfg)
    assert out.out_dir == work / "out" / "evaluation" and out.run_dir == work / "runs" / "p1"


def test_preprocess_spectrum_from_a_file(example: tuple[Path, dict[str, object]]) -> None:
    root, _ = example
    path = sorted((root / "demo" / "fits").rglob("*.fits*"))[0]
    spectrum = specabund.read_lamost(path)
    res = specabund.preprocess_spectrum(spectrum)
    again = specabund.preprocess_spectrum(path)
    np.testing.assert_array_equal(res.flux, again.flux)
