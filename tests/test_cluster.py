"""``--cluster``: a real Dask LocalCluster of 2 worker processes gives the single-process results, byte for
byte, also when one worker process is killed in the middle of the run."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from specabund.dataset import load_dataset
from specabund.distributed import check_cluster_address, dask_client, process_peak_rss
from specabund.preprocess import PipelineSettings, run_preprocess
from specabund.preprocess.pipeline import process_chunk
from specabund.simulate import simulate_dataset
from specabund.utils import hash_file

SETS = ("train", "val", "test", "reference", "prediction")
KILL_MARKER_ENV = "SPECABUND_TEST_KILL_MARKER"


def killing_chunk_task(args: list[Any], path: str, n_pixels: int, marker: str) -> str:
    """``process_chunk``, except that the first call of the run kills its own worker process (SIGKILL)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return process_chunk(args, path, n_pixels)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client("local", 2, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate_dataset(48, out, seed=11, layout="mixed")
    return out


def _pre(sim: Path, out: Path, fmt: str = "npz", **kw: Any) -> dict:
    return run_preprocess(
        fits_dir=sim / "fits",
        output_dir=out,
        reference_csv=sim / "X_FE.csv",
        prediction_csv=sim / "galah_X_FE.csv",
        settings=PipelineSettings(chunk_size=8, format=fmt),
        **kw,
    )


@pytest.fixture(scope="module")
def single(sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _pre(sim, out)
    return out


def _same_files(a: Path, b: Path) -> None:
    for name in SETS:
        assert hash_file(a / f"{name}_dataset.npz") == hash_file(b / f"{name}_dataset.npz"), name
    assert hash_file(a / "rejected.csv") == hash_file(b / "rejected.csv")


def test_cluster_address_is_checked() -> None:
    assert check_cluster_address(None) is None
    assert check_cluster_address("local") == "local"
    assert check_cluster_address("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"
    with pytest.raises(ValueError, match="scheduler address"):
        check_cluster_address("10.0.0.1")


def test_local_workers_get_the_allocator_environment(client: Any) -> None:
    from specabund.distributed import WORKER_ENVIRON

    def environ() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in WORKER_ENVIRON}

    want = {k: os.environ.get(k, v) for k, v in WORKER_ENVIRON.items()}
    assert list(client.run(environ).values()) == [want, want]


def test_preprocess_on_cluster_is_byte_identical(
    client: Any, sim: Path, single: Path, tmp_path: Path
) -> None:
    _pre(sim, tmp_path, client=client)
    _same_files(single, tmp_path)
    # a rerun finds every chunk cached and submits nothing
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npz")}
    _pre(sim, tmp_path, client=client)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npz")} == mtimes
    _same_files(single, tmp_path)
    peaks = process_peak_rss(client)
    assert set(peaks) == {"scheduler", "worker0", "worker1"} and all(v > 0 for v in peaks.values())


def test_killed_worker_still_gives_the_same_result(
    client: Any, sim: Path, single: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "killed.pid"

    def task(args: list[Any], path: str, n_pixels: int) -> str:
        return killing_chunk_task(args, path, n_pixels, str(marker))

    out = tmp_path / "out"
    _pre(sim, out, client=client, chunk_task=task)
    assert marker.exists()  # a worker process was killed
    _same_files(single, out)
    pids = {int(p) for p in client.run(os.getpid).values()}
    assert int(marker.read_text()) not in pids and len(pids) == 2  # the nanny replaced it


def test_zarr_on_cluster_equals_single_process(client: Any, sim: Path, single: Path, tmp_path: Path) -> None:
    _pre(sim, tmp_path, "zarr", client=client)
    for name in SETS:
        a, b = load_dataset(single / f"{name}_dataset.npz"), load_dataset(tmp_path / f"{name}_dataset.zarr")
        assert np.array_equal(a.X, np.asarray(b.X)) and np.array_equal(a.ivar, np.asarray(b.ivar))
        assert np.array_equal(a.y, b.y, equal_nan=True) and np.array_equal(a.spec, b.spec)


def test_report_and_plots_on_cluster_are_byte_identical(client: Any, sim: Path, tmp_path: Path) -> None:
    # with a client the workers write the datasets and the validation report while the client draws the
    # preprocessing plots: every file must be what the single process writes, one after the other
    a, b = tmp_path / "single", tmp_path / "cluster"
    _pre(sim, a, plots_dir=a / "plots")
    _pre(sim, b, plots_dir=b / "plots", client=client)
    _same_files(a, b)
    files = sorted(
        p.relative_to(a) for d in ("validation", "plots") for p in (a / d).rglob("*") if p.is_file()
    )
    assert any(f.suffix == ".png" for f in files) and (a / "validation" / "validation_report.txt").exists()
    assert files == sorted(
        p.relative_to(b) for d in ("validation", "plots") for p in (b / d).rglob("*") if p.is_file()
    )
    for f in [*files, Path("manifest.json")]:
        assert hash_file(a / f) == hash_file(b / f), f


def test_simulate_on_cluster_writes_the_same_files(client: Any, sim: Path, tmp_path: Path) -> None:
    simulate_dataset(48, tmp_path, seed=11, layout="mixed", client=client, chunk_size=10)
    for name in ("X_FE.csv", "galah_X_FE.csv", "truth.csv"):
        assert hash_file(tmp_path / name) == hash_file(sim / name), name
    files = sorted(p.name for p in (sim / "fits").iterdir())
    assert sorted(p.name for p in (tmp_path / "fits").iterdir()) == files
    for f in files:
        assert hash_file(tmp_path / "fits" / f) == hash_file(sim / "fits" / f), f
    assert len(list((tmp_path / ".simulate-chunks").glob("*.json"))) == 5


@pytest.fixture(scope="module")
def model_dir(single: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from specabund.models.registry import default_config
    from specabund.training import TrainConfig, train

    run = tmp_path_factory.mktemp("model") / "run"
    tr, va = load_dataset(single / "train_dataset.npz"), load_dataset(single / "val_dataset.npz")
    labels = [e for e in tr.elements if e.endswith("_FE")][:2]
    train(tr, va, labels, default_config("rescnn_small"), TrainConfig(epochs=1, batch_size=8), run)
    return run


def test_predict_in_parts_on_cluster_equals_in_process(
    client: Any, single: Path, model_dir: Path, tmp_path: Path
) -> None:
    import pandas as pd

    from specabund.dataset import save_dataset
    from specabund.predict.parts import predict_in_parts

    kw = {"part_rows": 4, "n_samples": 5, "batch_size": 8, "seed": 3}
    data = single / "prediction_dataset.npz"
    a = predict_in_parts(data, model_dir, tmp_path / "here", **kw)
    zarr_path = tmp_path / "prediction_dataset.zarr"
    save_dataset(zarr_path, load_dataset(data), chunk_rows=4)
    b = predict_in_parts(zarr_path, model_dir, tmp_path / "cluster", client=client, **kw)
    n = len(load_dataset(data))
    assert a["n_input"] == b["n_input"] == n and len(a["parts"]) == -(-n // 4)
    here, there = tmp_path / "here" / "predictions.csv", tmp_path / "cluster" / "predictions.csv"
    assert here.read_bytes() == there.read_bytes()
    df = pd.read_csv(here)
    assert len(df) == n and df["spec"].tolist() == load_dataset(data).spec.tolist()
    assert np.isfinite(df[[c for c in df.columns if c.endswith("_err")]].to_numpy()).all()
    # a rerun skips the finished parts
    stamp = (tmp_path / "cluster" / "parts" / "part-00000" / "summary.json").stat().st_mtime_ns
    predict_in_parts(zarr_path, model_dir, tmp_path / "cluster", client=client, **kw)
    assert (tmp_path / "cluster" / "parts" / "part-00000" / "summary.json").stat().st_mtime_ns == stamp


def test_cli_preprocess_cluster_local_zarr(sim: Path, single: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from specabund.cli import main

    args = ["--workdir", str(tmp_path), "preprocess", "--reference-csv", str(sim / "X_FE.csv")]
    args += ["--prediction-csv", str(sim / "galah_X_FE.csv"), "--fits-dir", str(sim / "fits")]
    args += ["--output-dir", str(tmp_path / "out"), "--chunk-size", "8", "--no-plots"]
    r = CliRunner().invoke(main, [*args, "--cluster", "nowhere"])
    assert r.exit_code == 2 and "scheduler address" in r.output
    r = CliRunner().invoke(main, [*args, "--cluster", "local", "--n-workers", "2", "--format", "zarr"])
    assert r.exit_code == 0, r.output
    z = load_dataset(tmp_path / "out" / "train_dataset.zarr")
    assert np.array_equal(np.asarray(z.X), load_dataset(single / "train_dataset.npz").X)


def test_cli_predict_zarr_streams_in_parts(single: Path, model_dir: Path, tmp_path: Path) -> None:
    import pandas as pd
    from click.testing import CliRunner

    from specabund.cli import main
    from specabund.dataset import save_dataset

    data = tmp_path / "prediction_dataset.zarr"
    save_dataset(data, load_dataset(single / "prediction_dataset.npz"), chunk_rows=4)
    args = ["--workdir", str(tmp_path), "predict", "--data-path", str(data), "--model", str(model_dir)]
    args += ["--output-dir", str(tmp_path / "pred"), "--chunk-size", "5", "--mc-samples", "4", "--no-plots"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "parts" in r.output
    df = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(df) == len(load_dataset(data))
    r = CliRunner().invoke(main, [*args[:3], "--fits-dir", str(tmp_path), *args[5:], "--cluster", "local"])
    assert r.exit_code == 2 and "--cluster predicts a preprocessed --data-path" in r.output
