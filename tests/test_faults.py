"""Faults: ``kill -9`` at several points then a rerun, a full disk, concurrent runs, interrupted training.

A killed run is a subprocess whose process sends itself SIGKILL at the n-th call of a chosen function
(``corpus.run_killed``); the rerun and the uninterrupted reference run are in-process (CliRunner). Outputs
are compared byte for byte where they hold no time stamps, and field by field otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import corpus
from corpus import PREDICT_FAST, Base, cli

TRAIN2 = ["--model-name", "rescnn_small", "--epochs", "2", "--batch-size", "8", "--device", "cpu"]
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Exception ignored", "--- Logging error ---")


@pytest.fixture(scope="session")
def corpus_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return corpus.shared_base(tmp_path_factory)


@pytest.fixture(autouse=True)
def _no_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", corpus._stub_savefig)


def ok(r: Any) -> str:
    assert r.exit_code == 0, r.output[-3000:]
    return r.output


def one_error(r: Any) -> str:
    for marker in TRACEBACK_MARKERS:
        assert marker not in r.output, r.output[-3000:]
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1, r.output[-3000:]
    return lines[0]


def killed(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == -signal.SIGKILL, f"not killed (rc {p.returncode}):\n{p.stderr[-3000:]}"


def _files(folder: Path) -> dict[str, bytes]:
    """The visible files of a folder and their content (hidden lock and staging entries left out)."""
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")}


def same_bytes(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def workdir(base: Base, tmp: Path) -> Path:
    """A workdir with the shared preprocessed data and models (copied: runs write into them)."""
    import shutil

    shutil.copytree(base.processed, tmp / "processed_data")
    shutil.copytree(base.root / "models", tmp / "models")
    return tmp


# ------------------------------------------------------------------------------------------ kill -9


def test_kill_during_preprocessing_chunks(corpus_base: Base, tmp_path: Path) -> None:
    cat = pd.read_csv(corpus_base.reference_csv).head(12)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    csv = str(tmp_path / "cat.csv")
    args = ["preprocess", "--reference-csv", csv, "--fits-dir", str(corpus_base.fits), "--no-plots"]
    args += ["--chunk-size", "4"]
    p = corpus.run_killed(
        "specabund.preprocess.pipeline:_write_chunk", 2, ["--workdir", str(tmp_path / "k"), *args]
    )
    killed(p)
    out_k = tmp_path / "k" / "processed_data"
    assert len(list((out_k / "cache" / "preprocessing").glob("*.npz"))) == 1  # chunk 1 kept
    assert not (out_k / "reference_dataset.npz").exists()
    assert not (out_k / "resolved_config.toml").exists()  # written only with the outputs
    ok(cli(tmp_path / "k", *args))
    ok(cli(tmp_path, *args))  # uninterrupted
    names = [f"{s}_dataset.npz" for s in ("reference", "train", "val", "test")]
    same_bytes(out_k, tmp_path / "processed_data", [*names, "rejected.csv", "manifest.json"])


def test_kill_during_training_epochs_then_resume(corpus_base: Base, tmp_path: Path) -> None:
    """Issue 16 item 1: a run killed after its first checkpoint resumes with `--resume RUN` alone."""
    w = workdir(corpus_base, tmp_path)
    args = ["train", "--elements", "C_FE", *TRAIN2, "--early-stopping", "0"]
    p = corpus.run_killed(
        "specabund.training.trainer:save_checkpoint", 2, ["--workdir", str(w), *args, "--run-name", "kr"]
    )
    killed(p)
    run = w / "models" / "kr"
    assert {"checkpoint.pt", "metrics.csv", "resolved_config.toml", "train_args.json"} <= {
        f.name for f in run.iterdir()
    }
    assert not (run / "config.json").exists()
    before = (run / "resolved_config.toml").read_bytes()
    # without --resume: refused with what to do
    line = one_error(cli(w, *args, "--run-name", "kr"))
    assert "interrupted" in line and "--resume kr" in line and "--overwrite" in line
    # a refused resume (other labels) leaves the run's files alone
    line = one_error(cli(w, "train", "--resume", "kr", "--elements", "MG_FE"))
    assert "cannot resume" in line
    assert (run / "resolved_config.toml").read_bytes() == before
    # predict does not take an unfinished run
    assert "not found" in one_error(cli(w, "predict", "--model", "kr", *PREDICT_FAST))
    out = ok(cli(w, "train", "--resume", "kr"))
    assert "best epoch" in out
    ok(cli(w, *args, "--run-name", "full"))  # uninterrupted
    full = w / "models" / "full"
    same_bytes(run, full, ["model.safetensors", "resolved_config.toml"])
    a, b = (json.loads((d / "config.json").read_text()) for d in (run, full))
    for key in ("labels", "label_mean", "label_std", "best_epoch", "best_val_loss", "final_metrics"):
        assert a[key] == b[key], key
    m_a, m_b = (pd.read_csv(d / "metrics.csv") for d in (run, full))
    cols = [c for c in m_a.columns if c not in ("epoch_time_s", "memory_mb")]
    pd.testing.assert_frame_equal(m_a[cols], m_b[cols])


def test_resume_without_checkpoint_says_what_to_do(corpus_base: Base, tmp_path: Path) -> None:
    w = workdir(corpus_base, tmp_path)
    (w / "models" / "early").mkdir()
    (w / "models" / "early" / "resolved_config.toml").write_text("# from an attempt killed in epoch 1\n")
    line = one_error(cli(w, "train", "--resume", "early"))
    assert "holds no checkpoint.pt" in line and "--run-name early --overwrite" in line
    assert "not found" in one_error(cli(w, "train", "--resume", "never"))


def test_kill_while_writing_predictions(corpus_base: Base, tmp_path: Path) -> None:
    w = workdir(corpus_base, tmp_path)
    data = str(corpus_base.processed / "prediction_dataset.npz")
    common = ["predict", "--data-path", data, "--model", "tiny", "--output-dir", "pred", *PREDICT_FAST]
    ok(cli(w, *common, "--seed", "1"))
    pred = w / "pred"
    old = _files(pred)
    assert "resolved_config.toml" in old and "predictions.fits" in old
    # killed while the FITS catalogue of a run with other settings is being written
    p = corpus.run_killed(
        "specabund.predict.catalogue:write_table", 1, ["--workdir", str(w), *common, "--seed", "2"]
    )
    killed(p)
    # the earlier run is untouched, and nothing half-written is visible
    assert _files(pred) == old
    ok(cli(w, *common, "--seed", "2"))  # rerun: removes the killed run's staging folder
    assert not [f for f in pred.iterdir() if f.name.startswith(".")]
    ok(cli(w, *common[: -len(PREDICT_FAST)], "--output-dir", "ref", *PREDICT_FAST, "--seed", "2"))
    same_bytes(pred, w / "ref", ["predictions.csv", "predictions.fits", "resolved_config.toml"])
    a, b = (json.loads((d / "summary.json").read_text()) for d in (pred, w / "ref"))
    assert a["files"] == b["files"] and a["n_predicted"] == b["n_predicted"]
    # killed while the new files are moved into place (after the first one): the rerun completes the set
    argv = ["--workdir", str(w), *common, "--seed", "1"]
    killed(corpus.run_killed("os:replace", 2, argv, match=".predict-staging"))
    ok(cli(w, *common, "--seed", "1"))
    now = _files(pred)
    assert sorted(now) == sorted(old)
    assert all(now[k] == old[k] for k in old if k != "summary.json")  # summary.json holds timings


def test_kill_during_tuning_trial_then_rerun(corpus_base: Base, tmp_path: Path) -> None:
    """Killed in the second of three trials, the rerun ends with what an uninterrupted run holds."""
    import tomllib

    import optuna

    args = ["tune", "--elements", "C_FE", "--n-trials", "3", "--epochs-per-trial", "1"]
    args += ["--batch-size-hyperopt", "8", "--method", "tpe", "--pruner", "none"]
    k, u = tmp_path / "k", tmp_path / "u"
    for d in (k, u):
        workdir(corpus_base, d)
    # killed in the second trial, at its first checkpoint (each trial saves after its epoch and at its end)
    argv = ["--workdir", str(k), *args]
    killed(corpus.run_killed("specabund.training.trainer:save_checkpoint", 3, argv))
    ok(cli(k, *args))
    ok(cli(u, *args))  # uninterrupted
    hk, hu = (d / "results" / "hyperopt" for d in (k, u))
    study = optuna.load_study(study_name="specabund", storage=f"sqlite:///{hk / 'specabund.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"], states
    assert study.trials[2].user_attrs["retry_of"] == 1
    assert study.trials[2].params == study.trials[1].params  # the killed trial's parameters, re-run

    def done(folder: Path) -> pd.DataFrame:
        t = pd.read_csv(folder / "trials.csv")
        t = t[t["state"].isin(["COMPLETE", "PRUNED"])].reset_index(drop=True)
        cols = ["state", "value", "round", "batches", "n_train", "n_params", "best_epoch", "val_loss_se"]
        return t[cols + sorted(c for c in t.columns if c.startswith(("param_", "rmse_")))]

    pd.testing.assert_frame_equal(done(hk), done(hu), check_dtype=False)  # NaN of the FAIL row: floats
    assert len(done(hk)) == 3
    for name in ("best_params.toml", "robust_params.toml"):
        a, b = ((d / name).read_text() for d in (hk, hu))
        assert tomllib.loads(a) == tomllib.loads(b), name
        # the header comments differ only in the trial numbers (shifted by one after the killed trial)
        assert re.sub(r"trial \d+", "trial N", a) == re.sub(r"trial \d+", "trial N", b), name
    assert (hk / "resolved_config.toml").exists()


def test_kill_during_baseline_batches_then_rerun(corpus_base: Base, tmp_path: Path) -> None:
    args = ["baseline", "--element", "C_FE", "--model", "lightgbm", "--batch-size", "6", "--n-threads", "1"]
    k, u = tmp_path / "k", tmp_path / "u"
    for d in (k, u):
        workdir(corpus_base, d)
    target = "specabund.baselines.runner:_Run.fit_batch"
    killed(corpus.run_killed(target, 2, ["--workdir", str(k), *args]))
    done = k / "results" / "baseline_C_FE_lightgbm_batch_results"
    assert (done / "batch_1" / "metrics.json").exists() and not (done / "batch_2").exists()
    ok(cli(k, *args))
    ok(cli(u, *args))
    a = pd.read_csv(k / "results" / "baseline" / "comparison.csv")
    b = pd.read_csv(u / "results" / "baseline" / "comparison.csv")
    pd.testing.assert_frame_equal(a, b)
    ub = u / "results" / "baseline_C_FE_lightgbm_batch_results" / "models"
    kb = done / "models"
    assert sorted(f.name for f in kb.iterdir()) == sorted(f.name for f in ub.iterdir())
    for f in ub.iterdir():
        assert (kb / f.name).read_bytes() == f.read_bytes(), f.name


# --------------------------------------------------------------------------------------- full disk


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A folder on a full disk: a 256 KiB tmpfs when running as root, or an injected ENOSPC (every write
    of more than a few bytes into the folder fails, as on a full disk)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        (folder / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # 16 KiB left
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=False)
        return
    mp = pytest.MonkeyPatch()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def write(self, data: Any) -> int:
            if len(data) > 64:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._fh.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fh, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: Any) -> None:
            self._fh.close()

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        fh = real_fdopen(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        return Full(fh) if name.startswith(str(folder)) else fh

    mp.setattr(os, "fdopen", fdopen)
    (folder / "filler").write_bytes(b"")
    try:
        yield folder
    finally:
        mp.undo()


def _no_partial_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.name.endswith(".tmp") or p.name.startswith(".predict-staging")]  # fmt: skip


def test_predict_onto_a_full_disk(corpus_base: Base, tmp_path: Path, full_disk: Path) -> None:
    w = workdir(corpus_base, tmp_path / "w")
    out = full_disk / "pred"
    out.mkdir()
    (out / "predictions.csv").write_text("spec\nearlier\n")  # an earlier, smaller result
    data = str(corpus_base.processed / "prediction_dataset.npz")
    r = cli(w, "predict", "--data-path", data, "--model", "tiny", "--output-dir", str(out), *PREDICT_FAST)
    line = one_error(r)
    assert str(out) in line and "no space left on the device (ENOSPC)" in line
    assert (out / "predictions.csv").read_text() == "spec\nearlier\n"
    assert not _no_partial_files(full_disk) and not (out / "summary.json").exists()
    assert not (out / "resolved_config.toml").exists()


def test_preprocess_onto_a_full_disk(corpus_base: Base, tmp_path: Path, full_disk: Path) -> None:
    cat = pd.read_csv(corpus_base.reference_csv).head(12)
    cat.to_csv(tmp_path / "cat.csv", index=False)
    out = full_disk / "pp"
    r = cli(tmp_path, "preprocess", "--reference-csv", "cat.csv", "--fits-dir", str(corpus_base.fits),
            "--output-dir", str(out), "--no-plots")  # fmt: skip
    line = one_error(r)
    assert str(out) in line and "no space left on the device (ENOSPC)" in line
    assert not _no_partial_files(full_disk)
    assert not (out / "reference_dataset.npz").exists() and not (out / "resolved_config.toml").exists()


def test_npz_writer_on_a_full_disk_leaves_no_noise(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The 'Exception ignored ... seek of closed file' after ENOSPC (utils.add_chunks) is gone."""
    import gc

    from specabund.errors import OutputError
    from specabund.utils import NpzWriter, atomic_write

    class FullAfter:
        def __init__(self, fh: Any, budget: int) -> None:
            self.fh, self.budget = fh, budget

        def write(self, b: Any) -> int:
            self.budget -= len(b)
            if self.budget < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(b)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    path = tmp_path / "x.npz"
    with pytest.raises(OutputError, match="no space left"):
        with atomic_write(path, "wb") as fh:
            w = NpzWriter(FullAfter(fh, 5000))  # type: ignore[arg-type]
            w.add_chunks("X", (100, 100), np.float32, [np.ones((100, 100), np.float32)])
            w.close()
    del w
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------- concurrency

HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from specabund.workspace import FolderLock
lock = FolderLock({folder!r}, "specabund predict").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=src, folder=str(folder))],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pid-file"])
def test_second_run_into_a_folder_is_refused_and_stale_locks_are_taken_over(
    flock: bool, corpus_base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import specabund.workspace as wsmod

    if not flock:
        monkeypatch.setattr(wsmod, "fcntl", None)
    w = workdir(corpus_base, tmp_path)
    out = w / "pred"
    data = str(corpus_base.processed / "prediction_dataset.npz")
    args = ["predict", "--data-path", data, "--model", "tiny", "--output-dir", str(out), *PREDICT_FAST]
    holder = _hold_lock(out)
    try:
        line = one_error(cli(w, *args))
        assert f"{out} is in use by 'specabund predict' (pid {holder.pid}" in line
        assert not (out / "predictions.csv").exists() and not (out / "resolved_config.toml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / wsmod.LOCK_FILE).exists()  # left behind by the killed holder
    ok(cli(w, *args))  # the stale lock is taken over
    assert not (out / wsmod.LOCK_FILE).exists()


def test_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    from specabund.workspace import LOCK_FILE, FolderLock

    with FolderLock(tmp_path, "a"), FolderLock(tmp_path, "b"):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_refused_predict_keeps_earlier_outputs_consistent(corpus_base: Base, tmp_path: Path) -> None:
    """Issue 16 item 9: resolved_config.toml is written with the outputs, never before."""
    w = workdir(corpus_base, tmp_path)
    data = str(corpus_base.processed / "prediction_dataset.npz")
    args = ["predict", "--data-path", data, "--model", "tiny", "--output-dir", "pred", *PREDICT_FAST]
    ok(cli(w, *args))
    before = (w / "pred" / "resolved_config.toml").read_bytes()
    cfg = tmp_path / "other.toml"
    cfg.write_text("[evaluation]\nlogg_split = 3.5\n")
    one_error(cli(w, *args, "--elements", "XX_FE", "--config", str(cfg)))
    assert (w / "pred" / "resolved_config.toml").read_bytes() == before


def test_stale_staging_of_a_dead_run_is_removed(corpus_base: Base, tmp_path: Path) -> None:
    w = workdir(corpus_base, tmp_path)
    stale = w / "pred" / ".predict-staging-999999999-x"
    stale.mkdir(parents=True)
    (stale / "predictions.csv").write_text("half")
    data = str(corpus_base.processed / "prediction_dataset.npz")
    ok(cli(w, "predict", "--data-path", data, "--model", "tiny", "--output-dir", "pred", *PREDICT_FAST))
    assert not stale.exists()


def test_killed_holder_releases_quickly(tmp_path: Path) -> None:
    """A kill -9 releases the flock at once: the next command does not wait."""
    holder = _hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    from specabund.workspace import FolderLock

    t0 = time.perf_counter()
    with FolderLock(tmp_path, "next"):
        pass
    assert time.perf_counter() - t0 < 1.0
