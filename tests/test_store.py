"""Dataset stores: npz and Zarr behind one interface, lazy rows, preprocess --format, streaming training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specabund.dataset import Dataset, load_dataset, save_dataset
from specabund.preprocess import PipelineSettings, run_preprocess
from specabund.simulate import simulate_dataset
from specabund.store import LazyRows, choose_format, resolve_dataset_path
from specabund.training.data import StoreBatches, StreamingRows, chunk_buffer_order
from specabund.training.saved import data_hash

SETS = ("train", "val", "test", "reference", "prediction")
COLUMNS = ("X", "ivar", "wavelength", "y", "y_err", "filenames", "obsid", "spec", "teff", "logg", "fe_h")
COLUMNS += ("snr", "split", "group")


def _toy(n: int = 37, p: int = 50, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 2)).astype(np.float32)
    y[3, 1] = np.nan
    return Dataset(
        X=rng.normal(1, 0.1, size=(n, p)).astype(np.float32),
        ivar=rng.uniform(0, 100, size=(n, p)).astype(np.float32),
        wavelength=np.linspace(4000, 5000, p),
        y=y,
        elements=["MG_FE", "TEFF"],
        filenames=np.array([f"f{i}.fits" for i in range(n)]),
        obsid=np.array([str(1000 + i) if i % 5 else "" for i in range(n)]),
        spec=np.array([f"spec-{i}-é" for i in range(n)]),
        teff=rng.uniform(4000, 6000, n).astype(np.float32),
        logg=np.full(n, np.nan, dtype=np.float32),
        fe_h=rng.normal(size=n).astype(np.float32),
        snr=rng.uniform(10, 100, n).astype(np.float32),
        split=(np.arange(n) % 3).astype(np.int8),
        group=np.array([f"star{i // 2}" for i in range(n)]),
        preprocess_hash="abc123",
        extra={"rv_used_kms": rng.normal(size=n).astype(np.float32)},
    )


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert len(a) == len(b) and a.elements == b.elements and a.preprocess_hash == b.preprocess_hash
    for f in COLUMNS:
        va, vb = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        assert va.dtype.kind == vb.dtype.kind, f
        if va.dtype.kind != "U":
            assert va.dtype == vb.dtype, f
        assert np.array_equal(va, vb, equal_nan=va.dtype.kind == "f"), f
    assert sorted(a.extra) == sorted(b.extra)
    for k in a.extra:
        assert np.array_equal(a.extra[k], b.extra[k], equal_nan=a.extra[k].dtype.kind == "f"), k


@pytest.mark.parametrize("fmt", ["npz", "zarr"])
def test_both_backends_round_trip_the_same_dataset(fmt: str, tmp_path: Path) -> None:
    ds = _toy()
    path = tmp_path / f"x_dataset.{fmt}"
    save_dataset(path, ds, chunk_rows=10)
    back = load_dataset(path)
    assert isinstance(back.X, LazyRows) == (fmt == "zarr")
    _assert_same(ds, back)
    sub = back.split_subset("val")
    _assert_same(ds.split_subset("val"), sub)
    assert isinstance(sub.X, LazyRows) == (fmt == "zarr")  # a subset stays on disk
    assert data_hash(back.X, back.ivar, back.y) == data_hash(ds.X, ds.ivar, ds.y)
    # the other suffix finds it; writing the other format replaces it
    other = path.with_suffix(".zarr" if fmt == "npz" else ".npz")
    assert resolve_dataset_path(other) == path
    _assert_same(ds, load_dataset(other))
    save_dataset(other, ds, chunk_rows=10)
    assert other.exists() and not path.exists()


@pytest.mark.parametrize("fmt", ["npz", "zarr"])
def test_load_rows_equals_subset(fmt: str, tmp_path: Path) -> None:
    ds = _toy(n=45)
    path = tmp_path / f"x_dataset.{fmt}"
    save_dataset(path, ds, chunk_rows=8)
    for rows in (slice(0, 45), slice(5, 21), slice(40, 100), slice(44, None), slice(None, 3), slice(7, 7)):
        part = load_dataset(path, rows=rows)
        assert isinstance(part.X, LazyRows) == (fmt == "zarr")
        _assert_same(ds.subset(np.arange(45)[rows]), part)
    with pytest.raises(ValueError, match="step 1"):
        load_dataset(path, rows=slice(0, 10, 2))


def test_lazy_rows_index_like_numpy(tmp_path: Path) -> None:
    ds = _toy(n=45)
    save_dataset(tmp_path / "d.zarr", ds, chunk_rows=8)
    lazy = load_dataset(tmp_path / "d.zarr").X
    ref = ds.X
    assert lazy.shape == ref.shape and lazy.dtype == ref.dtype and len(lazy) == 45 and lazy.chunk_rows == 8
    for key in (3, -1, slice(5, 30, 3), slice(None), np.array([40, 2, 2, 17]), ref[:, 0] > 1.0):
        assert np.array_equal(lazy[key], ref[key])
    assert np.array_equal(lazy[4:9, 10:20], ref[4:9, 10:20])
    assert np.array_equal(np.asarray(lazy), ref)
    assert np.array_equal(lazy * 2, ref * 2)  # ufuncs read into memory
    view = lazy.subset(np.array([44, 0, 9, 10]))
    assert np.array_equal(view[1:3], ref[[0, 9]])
    assert np.array_equal(view.subset(np.array([True, False, False, True]))[:], ref[[44, 10]])
    with pytest.raises(IndexError):
        lazy[45]


def test_auto_format_by_size() -> None:
    assert choose_format("auto", 1000, 3584) == "npz"
    assert choose_format("auto", 100_000, 3584) == "zarr"
    assert choose_format("npz", 10**8, 3584) == "npz"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate_dataset(60, out, seed=3, layout="mixed")
    return out


def _pre(sim: Path, out: Path, fmt: str, **kw: object) -> dict:
    return run_preprocess(
        fits_dir=sim / "fits",
        output_dir=out,
        reference_csv=sim / "X_FE.csv",
        prediction_csv=sim / "galah_X_FE.csv",
        settings=PipelineSettings(chunk_size=16, format=fmt, **kw),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def zarr_out(sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zarr")
    _pre(sim, out, "zarr")
    return out


def test_preprocess_zarr_equals_npz(sim: Path, zarr_out: Path, tmp_path: Path) -> None:
    m = _pre(sim, tmp_path, "auto")  # small: auto keeps npz
    assert m["dataset_format"] == {"reference": "npz", "prediction": "npz"}
    man = json.loads((zarr_out / "manifest.json").read_text())
    assert man["dataset_format"] == {"reference": "zarr", "prediction": "zarr"}
    for name in SETS:
        assert (zarr_out / f"{name}_dataset.zarr" / "zarr.json").exists()
        assert not (zarr_out / f"{name}_dataset.npz").exists()
        z = load_dataset(zarr_out / f"{name}_dataset.zarr")
        assert isinstance(z.X, LazyRows) and z.X.chunk_rows == min(16, len(z))
        _assert_same(load_dataset(tmp_path / f"{name}_dataset.npz"), z)
    assert (zarr_out / "validation").is_dir()


def test_zarr_rerun_reuses_cached_chunks(sim: Path, zarr_out: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "again"
    shutil.copytree(zarr_out / "cache", out / "cache")
    _pre(sim, out, "zarr", max_chunks=0)  # every chunk cached: no chunk may be processed
    _assert_same(load_dataset(zarr_out / "train_dataset.zarr"), load_dataset(out / "train_dataset.zarr"))


def test_chunk_buffer_order_covers_rows_and_shards_by_rank() -> None:
    chunk_of_row = np.repeat(np.arange(10), 7)[5:]  # 65 rows in 10 chunks, the first partial
    batches = chunk_buffer_order(chunk_of_row, 6, torch.Generator().manual_seed(1), buffer_chunks=3)
    rows = np.concatenate(batches)
    assert len(set(rows.tolist())) == len(rows) >= 64  # a last batch of one row is dropped
    assert all(len(b) >= 2 for b in batches)
    assert all(len(np.unique(chunk_of_row[b])) <= 6 for b in batches)  # at most two buffers
    again = chunk_buffer_order(chunk_of_row, 6, torch.Generator().manual_seed(1), buffer_chunks=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    shards = [
        np.concatenate(chunk_buffer_order(chunk_of_row, 6, torch.Generator().manual_seed(1), 3, r, 2))
        for r in range(2)
    ]
    assert not set(chunk_of_row[shards[0]]) & set(chunk_of_row[shards[1]])
    assert len(np.unique(np.concatenate(shards))) >= 63


def test_store_batches_and_streaming_rows(tmp_path: Path) -> None:
    ds = _toy(n=50)
    save_dataset(tmp_path / "d.zarr", ds, chunk_rows=8)
    z = load_dataset(tmp_path / "d.zarr").subset(np.arange(50) != 7)
    want = ds.subset(np.arange(50) != 7)
    sb = StoreBatches(z.X, z.ivar, z.y, batch_size=5, seed=2, buffer_chunks=2)
    seen = []
    for xb, vb, yb, pos in torch.utils.data.DataLoader(sb, batch_size=None):
        p = pos.numpy()
        assert np.array_equal(xb.numpy(), want.X[p]) and np.array_equal(vb.numpy(), want.ivar[p])
        assert np.array_equal(yb.numpy(), want.y[p], equal_nan=True)
        seen += p.tolist()
    assert len(set(seen)) == len(seen) >= 48
    rows = StreamingRows(z.X, "cpu", cache_chunks=2)
    assert torch.equal(rows[3:20], torch.from_numpy(want.X[3:20]))
    assert torch.equal(rows[torch.tensor([48, 1])], torch.from_numpy(want.X[[48, 1]]))
    assert len(rows._cache) <= 2


def test_training_streams_from_a_zarr_store(zarr_out: Path, tmp_path: Path) -> None:
    from specabund.models.registry import default_config
    from specabund.training import TrainConfig, train

    tr = load_dataset(zarr_out / "train_dataset.zarr")
    va = load_dataset(zarr_out / "val_dataset.zarr")
    labels = [e for e in tr.elements if e.endswith("_FE")][:2]
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", seed=0)
    res = train(tr, va, labels, default_config("rescnn_small"), cfg, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert isinstance(tr.X, LazyRows)  # never read whole
    assert res.epochs_run == 2 and np.isfinite(res.history["val_loss"]).all()
    # the same data in memory give the same data hash (resume fingerprints carry over between formats)
    cfg_json = json.loads((tmp_path / "run" / "config.json").read_text())
    keep = np.isfinite(np.stack([tr.y[:, tr.elements.index(lab)] for lab in labels], 1)).any(1)
    y = np.stack([tr.y[:, tr.elements.index(lab)] for lab in labels], 1)[keep]
    want = data_hash(np.asarray(tr.X)[keep], np.asarray(tr.ivar)[keep], y)
    assert want in json.dumps(cfg_json)


def test_cli_train_and_test_accept_zarr_stores(zarr_out: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from specabund.cli import main

    fast = ["--model-name", "rescnn_small", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    for data in ("reference_dataset.zarr", "train_dataset.zarr"):  # split column, or val beside it
        args = ["--workdir", str(tmp_path), "train", "--data-path", str(zarr_out / data), *fast]
        r = CliRunner().invoke(main, [*args, "--elements", "MG_FE", "--run-name", data[:5]])
        assert r.exit_code == 0, r.output
    args = ["--workdir", str(tmp_path), "test", "--model", "refer", "--data-path"]
    r = CliRunner().invoke(main, [*args, str(zarr_out / "test_dataset.zarr"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
