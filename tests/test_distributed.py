"""``torchrun`` data-parallel training: 2 CPU processes (gloo) on a small simulated set.

Each test launches real processes with ``python -m torch.distributed.run --standalone`` (a free port).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import specabund
from helpers import simulated_workdir
from specabund.cli import main
from specabund.dataset import load_dataset
from specabund.errors import ConfigError
from specabund.training import LabelScaler, load_model, train
from specabund.training.distributed import env_context

TESTS = Path(__file__).parent
SRC = Path(specabund.__file__).parents[1]
ARGS = ["--elements", "MG_FE", "--model-name", "rescnn_small", "--epochs", "8", "--batch-size", "32",
        "--device", "cpu", "--seed", "42"]  # fmt: skip
#: Quality margin: the DDP model's score (test RMSE / label spread, averaged over the labels) may exceed the
#: single-process one by 10%. Measured on this set and config: single-process seeds 42, 43, 44 score 0.789,
#: 0.792, 0.816 (spread ~3%), 2-process DDP seeds 42, 43 score 0.790, 0.803; 10% is three times the seed-to-
#: seed spread, while a broken DDP (e.g. unsynchronised gradients or a wrong sampler) costs far more.
SCORE_MARGIN = 1.10


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _test_rmse(run: Path, test_path: Path) -> dict[str, float]:
    model, test = load_model(run), load_dataset(test_path)
    mu, _ = model.predict(test.X, test.ivar)
    out = {}
    for j, lab in enumerate(model.labels):
        y = test.y[:, test.elements.index(lab)]
        ok = np.isfinite(y)
        out[lab] = float(np.sqrt(np.mean((mu[ok, j] - y[ok]) ** 2)))
    return out


def _files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".specabund.lock"
    }


def test_not_distributed_without_torchrun_env() -> None:
    ctx = env_context()
    assert not ctx.enabled and ctx.is_primary and ctx.world_size == 1


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_torchrun_cli_trains_like_one_process(tmp_path: Path) -> None:
    sim = simulated_workdir(tmp_path / "sim", 300, seed=5)
    one, two = tmp_path / "one", tmp_path / "two"
    for w in (one, two):
        shutil.copytree(sim / "processed_data", w / "processed_data")
    r = CliRunner().invoke(main, ["--workdir", str(one), "train", *ARGS, "--run-name", "single"])
    assert r.exit_code == 0, r.output
    # no --run-name: the time-stamped folder name of rank 0 is used by both ranks
    p = _torchrun("-m", "specabund", "--workdir", str(two), "train", *ARGS)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count("saved model:") == 1  # rank 0 reports, rank 1 is silent
    assert "DistributedDataParallel over 2 processes: 16 spectra per process" in p.stderr
    # one set of outputs, the same files as a single-process run
    runs = [d for d in (two / "models").iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    assert _files(runs[0]) == _files(one / "models" / "single")
    assert sorted(d.name for d in (two / "results").iterdir()) == sorted(
        d.name for d in (one / "results").iterdir()
    )
    for d in (one / "results").iterdir():
        assert _files(two / "results" / d.name) == _files(d)
    assert len(pd.read_csv(runs[0] / "metrics.csv")) == 8
    # the same quality on the test set (SCORE_MARGIN), and clearly better than predicting the mean
    test_path = one / "processed_data" / "test_dataset.npz"
    single, ddp = _test_rmse(one / "models" / "single", test_path), _test_rmse(runs[0], test_path)
    test = load_dataset(test_path)
    spread = {lab: float(np.nanstd(test.y[:, test.elements.index(lab)])) for lab in single}
    score_single = float(np.mean([single[lab] / spread[lab] for lab in single]))
    score_ddp = float(np.mean([ddp[lab] / spread[lab] for lab in single]))
    print(f"test RMSE single {single} DDP {ddp}; score single {score_single:.3f} DDP {score_ddp:.3f}")
    assert score_ddp <= SCORE_MARGIN * score_single, (score_ddp, score_single)
    assert score_ddp < 0.9 and ddp["TEFF"] < 0.7 * spread["TEFF"], ddp


def test_torchrun_resume_is_exact(tmp_path: Path) -> None:
    p = _torchrun(str(TESTS / "ddp_worker.py"), "interrupted", str(tmp_path))
    assert p.returncode != 0 and "killed after epoch 2" in p.stderr, p.stderr[-4000:]
    assert (tmp_path / "full" / "model.safetensors").exists()
    assert not (tmp_path / "part" / "model.safetensors").exists()
    assert len(pd.read_csv(tmp_path / "part" / "metrics.csv")) == 2
    # a run of 2 processes is not resumed by another number of processes
    from ddp_worker import LABELS, default_config, make_synthetic, small_config

    data = make_synthetic(n=240, missing_frac=0.1)
    tr, va = data.split_subset("train"), data.split_subset("val")
    mcfg = default_config("rescnn_small", dropout=0.1, head_dropout=0.1)
    tcfg = small_config(epochs=3, batch_size=16)
    with pytest.raises(ConfigError, match="2 process"):
        train(tr, va, LABELS, mcfg, tcfg, tmp_path / "part", resume=True)
    p = _torchrun(str(TESTS / "ddp_worker.py"), "resume", str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    assert (tmp_path / "full" / "model.safetensors").read_bytes() == (
        tmp_path / "part" / "model.safetensors"
    ).read_bytes()
    drop = ["epoch_time_s", "memory_mb"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "full" / "metrics.csv").drop(columns=drop),
        pd.read_csv(tmp_path / "part" / "metrics.csv").drop(columns=drop),
        check_exact=True,
    )
    # a finished distributed run is returned as it is by a single process
    weights = (tmp_path / "part" / "model.safetensors").read_bytes()
    again = train(tr, va, LABELS, mcfg, tcfg, tmp_path / "part", resume=True)
    assert again.epochs_run == 3 and (tmp_path / "part" / "model.safetensors").read_bytes() == weights


def test_torchrun_accepts_a_training_set_already_sharded(tmp_path: Path) -> None:
    from ddp_worker import LABELS, make_synthetic

    p = _torchrun(str(TESTS / "ddp_worker.py"), "sharded", str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "training data sharded by the caller" in p.stderr
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    tr = make_synthetic(n=240, missing_frac=0.1).split_subset("train")
    y = tr.y[:, [tr.elements.index(lab) for lab in LABELS]]
    full = LabelScaler.fit(y[np.isfinite(y).any(axis=1)], LABELS)  # the scaler of all shards together
    assert config["n_train"] == len(tr) and config["epochs_run"] == 2
    np.testing.assert_allclose(config["label_mean"], full.mean, rtol=1e-6)


def test_torchrun_deals_a_store_to_the_ranks_by_chunk(tmp_path: Path) -> None:
    """From a Zarr store every rank trains on its own chunks (disjoint, together all of them, a new deal
    every epoch) and takes the same number of steps; no rank reads rows at random across the store."""
    from specabund.training.trainer import store_rank_steps

    p = _torchrun(str(TESTS / "ddp_worker.py"), "store", str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "the training store's chunks dealt to the processes" in p.stderr
    seen = [json.loads((tmp_path / f"chunks-{r}.json").read_text()) for r in (0, 1)]
    n_chunks = len(np.unique(load_dataset(tmp_path / "train_dataset.zarr").X.base_rows // 20))
    for epoch in ("1", "2"):  # (epochs count from 1)
        a, b = set(seen[0][epoch]), set(seen[1][epoch])
        assert not a & b  # disjoint
        assert len(a | b) >= n_chunks - 2  # all chunks but what the equal step count leaves out
        assert seen[0][f"steps{epoch}"] == seen[1][f"steps{epoch}"]
    assert seen[0]["1"] != seen[0]["2"]  # dealt anew each epoch
    config = json.loads((tmp_path / "store" / "config.json").read_text())
    assert config["epochs_run"] == 2
    chunk_of_row = np.repeat(np.arange(n_chunks), 20)[: config["n_train"]]
    assert seen[0]["steps1"] == store_rank_steps(chunk_of_row, 8, 2)


def test_store_rank_steps() -> None:
    from specabund.training.trainer import store_rank_steps

    rows = np.repeat(np.arange(5), [20, 20, 20, 20, 7])  # 5 chunks, the last short
    assert store_rank_steps(rows, 8, 2) == (7 + 20) // 8  # 2 chunks each at least, the 2 smallest
    assert store_rank_steps(rows, 8, 1) == 87 // 8
    with pytest.raises(ConfigError, match="5 chunk"):
        store_rank_steps(rows, 8, 6)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        store_rank_steps(rows, 64, 2)
