"""Prediction of a large dataset in parts: streamed input, a catalogue written part by part.

The rows of the dataset (a Zarr store, read lazily, or an ``.npz``) are cut into parts of ``part_rows``
spectra. Each part is one call of :func:`~specabund.predict.catalogue.run_prediction` on just its rows,
writing a complete catalogue of the part into ``<out>/parts/part-NNNNN/`` (``predictions.csv``,
``predictions.fits``, ``summary.json``; all-or-nothing per part). Part ``k`` uses the MC-Dropout seed
derived from ``(seed, k)``, so the result does not depend on where or in which order the parts run: in
this process, or one Dask task per part (``--cluster``), each worker writing its part itself. A part whose
``summary.json`` carries the same part key (data, model, rows, settings) is skipped on a rerun.

When all parts exist, ``<out>/predictions.csv`` is assembled by streaming the parts' CSV files (one header),
and ``<out>/summary.json`` sums their counts (``parts`` lists them). Memory: one part, never all rows.
Repeat observations are compared within a part only, and per-batch tracking is not written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write, atomic_write_json, hash_json

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
_MODELS: dict[tuple[str, str], Any] = {}
_NPZ: dict[tuple[str, int, int], Any] = {}


def part_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed), 7919, int(k)]).generate_state(1)[0] & 0x7FFFFFFF)


def _model(run_dir: str, device: str) -> Any:
    """The model of ``run_dir``, loaded once per process (a Dask worker keeps it between parts)."""
    key = (str(run_dir), str(device))
    if key not in _MODELS:
        from ..training import load_model

        _MODELS.clear()
        _MODELS[key] = load_model(run_dir, device)
    return _MODELS[key]


def _rows(data_path: str, lo: int, hi: int) -> Any:
    """Rows ``[lo, hi)`` of the dataset: from a Zarr store just those rows of every column; an ``.npz`` is
    read whole once per process (it cannot be read in part) and kept for the next part."""
    from ..dataset import load_dataset
    from ..store import is_zarr

    if is_zarr(data_path):
        return load_dataset(data_path, rows=slice(lo, hi))
    st = Path(data_path).stat()
    key = (str(data_path), st.st_size, st.st_mtime_ns)
    if key not in _NPZ:
        _NPZ.clear()
        _NPZ[key] = load_dataset(data_path)
    return _NPZ[key].subset(np.arange(lo, hi))


def predict_part(
    data_path: str, lo: int, hi: int, part_dir: str, part_key: str, run_dir: str, device: str, kw: dict
) -> dict[str, Any]:
    """Predict rows ``[lo, hi)`` of ``data_path`` into ``part_dir`` (one task); return its summary."""
    done = _finished(Path(part_dir), part_key)
    if done is not None:
        return done
    from .catalogue import run_prediction
    from .inputs import PredictionInputs

    part = _rows(data_path, lo, hi)
    part.X, part.ivar = np.asarray(part.X, dtype=np.float32), np.asarray(part.ivar, dtype=np.float32)
    inputs = PredictionInputs.from_dataset(part)
    return run_prediction(
        _model(run_dir, device),
        inputs,
        part_dir,
        chunk_size=max(hi - lo, 1),
        batch_root=None,
        extra={"part": {"key": part_key, "rows": [lo, hi], "data": str(data_path)}},
        **kw,
    )


def _finished(part_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        s = json.loads((part_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if s.get("part", {}).get("key") == key and (part_dir / "predictions.csv").exists():
        return s
    return None


def predict_in_parts(
    data_path: str | Path,
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    part_rows: int = 10000,
    device: str = "cpu",
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    n_samples: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    apply_calibration: bool = True,
    plots: bool = False,
    client: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every row of ``data_path`` part by part (module docstring); return the combined summary.

    ``client`` (a ``distributed.Client``) runs each unfinished part as one Dask task; without it the parts
    run here, one after the other.
    """
    from ..dataset import load_dataset
    from ..store import resolve_dataset_path

    t0 = time.perf_counter()
    data_path = resolve_dataset_path(data_path)
    out_dir = Path(out_dir)
    parts_root = out_dir / PARTS_DIR
    parts_root.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data_path)  # columns only for a Zarr store
    n = len(ds)
    kw = {
        "labels": list(labels) if labels else None,
        "ensemble_mode": ensemble_mode,
        "n_samples": n_samples,
        "batch_size": batch_size,
        "apply_calibration": apply_calibration,
        "plots": plots,
    }
    weights = [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(run_dir).rglob("*"))
        if p.is_file() and p.suffix in (".safetensors", ".json")
    ]
    base_key = {
        "data": [str(Path(data_path).resolve()), n, ds.preprocess_hash],
        "model": [str(Path(run_dir).resolve()), weights],
        "settings": kw,
        "seed": seed,
    }
    bounds = [(lo, min(lo + part_rows, n)) for lo in range(0, n, max(1, part_rows))]
    tasks = []
    for k, (lo, hi) in enumerate(bounds):
        key = hash_json({**base_key, "rows": [lo, hi]})[:24]
        part_kw = {**kw, "seed": part_seed(seed, k)}
        pdir = parts_root / f"part-{k:05d}"
        tasks.append((str(data_path), lo, hi, str(pdir), key, str(run_dir), str(device), part_kw))
    del ds
    todo = [i for i, t in enumerate(tasks) if _finished(Path(t[3]), t[4]) is None]
    logger.info("predict: %d spectra in %d parts, %d to run", n, len(tasks), len(todo))
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="spec", desc="predict", disable=not logger.isEnabledFor(logging.INFO))
    bar.update(n - sum(tasks[i][2] - tasks[i][1] for i in todo))

    def done(j: int, summary: dict[str, Any]) -> None:
        i = todo[j]
        bar.update(tasks[i][2] - tasks[i][1])
        logger.info("predict part %d: %d spectra", i, summary["n_input"])

    if client is not None:
        from ..distributed import run_tasks

        keys = [f"predict-{tasks[i][4]}" for i in todo]
        run_tasks(client, predict_part, [tasks[i] for i in todo], keys, done)
    else:
        for j, i in enumerate(todo):
            done(j, predict_part(*tasks[i]))
    bar.close()
    summaries = [predict_part(*t) for t in tasks]  # all finished: read back
    part_dirs = [Path(t[3]) for t in tasks]
    _concat_csv([d / "predictions.csv" for d in part_dirs], out_dir / "predictions.csv")
    summary = _combine(summaries, [d.relative_to(out_dir).as_posix() for d in part_dirs])
    summary["elapsed_seconds"] = time.perf_counter() - t0
    summary["spectra_per_second"] = n / summary["elapsed_seconds"] if summary["elapsed_seconds"] else None
    summary.update(extra or {})
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _concat_csv(parts: list[Path], dest: Path) -> None:
    """Concatenate CSV files with identical headers, streaming (one header)."""
    with atomic_write(dest, "w", encoding="utf-8", newline="") as out:
        header: str | None = None
        for p in parts:
            with open(p, encoding="utf-8", newline="") as fh:
                h = fh.readline()
                if header is None:
                    header = h
                    out.write(h)
                elif h != header:
                    raise ValueError(f"{p}: columns differ from the first part's")
                while block := fh.read(1 << 20):
                    out.write(block)


def _combine(summaries: list[dict[str, Any]], part_dirs: list[str]) -> dict[str, Any]:
    first = summaries[0]
    out: dict[str, Any] = {
        k: first[k]
        for k in ("model", "mode", "labels", "mc_samples", "n_members", "calibrated", "calibration_scale")
        if k in first
    }
    for k in ("n_input", "n_predicted", "n_failed", "n_flagged", "predict_seconds"):
        out[k] = sum(s.get(k, 0) or 0 for s in summaries)
    counts: dict[str, int] = {}
    for s in summaries:
        for k, v in s.get("flag_counts", {}).items():
            counts[k] = counts.get(k, 0) + int(v)
    out["flag_counts"] = counts
    out["flag_bits"] = first.get("flag_bits")
    out["parts"] = part_dirs
    out["catalogue"] = "predictions.csv (all parts); predictions.fits per part"
    return out
