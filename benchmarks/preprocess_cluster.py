"""Where the time of a ``--cluster local`` preprocessing run goes: wall and CPU time per part.

Simulates N spectra once (``simulate_dataset(N, seed=1)``, cached under ``--work``), then, ``--repeat``
times, starts a LocalCluster of ``--workers`` processes and runs ``run_preprocess(format='zarr',
client=...)`` from scratch (``--plots``: with the preprocessing plots, as the CLI does by default). It
prints for each run:

* the wall time of the run and the spectra per second per core (``N / wall / workers``);
* the client's CPU time (``time.process_time``: the scheduler of a LocalCluster runs in it too) and the
  wall and CPU time of its parts (planning, waiting for the chunks, assembling, plots);
* per chunk task, measured inside the worker: CPU time (user + system), system time, minor page faults
  and wall time, with the sum per spectrum. On a machine shared with other jobs the CPU times are the
  figures to compare; wall times only between runs done back to back (take the minimum).

    python benchmarks/preprocess_cluster.py --n 10000 --workers 2 --repeat 2 --work /tmp/pc
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

_TIMING_ENV = "SPECABUND_BENCH_CHUNK_TIMING"


def timed_chunk(args: list[Any], path: str, n_pixels: int) -> str:
    """``process_chunk`` that also writes its CPU/wall time and page faults next to the timing folder."""
    from specabund.preprocess.pipeline import process_chunk

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = time.process_time(), time.perf_counter()
    out = process_chunk(args, path, n_pixels)
    c1, w1 = time.process_time(), time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    folder = Path(os.environ[_TIMING_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    rec = {
        "pid": os.getpid(),
        "n": len(args),
        "cpu": c1 - c0,
        "sys": r1.ru_stime - r0.ru_stime,
        "minflt": r1.ru_minflt - r0.ru_minflt,
        "wall": w1 - w0,
        "end": time.time(),
    }
    (folder / f"{Path(path).stem}.json").write_text(json.dumps(rec))
    return out


def one_run(sim: Path, out: Path, workers: int, plots: bool) -> dict[str, Any]:
    import specabund.preprocess.pipeline as pl
    from specabund.distributed import dask_client
    from specabund.preprocess import PipelineSettings, run_preprocess

    timing = out.parent / f"{out.name}-chunks"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(timing, ignore_errors=True)
    os.environ[_TIMING_ENV] = str(timing)  # inherited by the worker processes started below
    parts: dict[str, list[float]] = {}
    originals = {}
    for name, label in (
        ("_plan", "plan"),
        ("_cluster_chunks", "chunks (client waits)"),
        ("_assemble", "assemble (datasets, report, plots)"),
    ):
        f = originals[name] = getattr(pl, name)

        def wrapped(*a: Any, _f: Any = f, _label: str = label, **k: Any) -> Any:
            c, w = time.process_time(), time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                p = parts.setdefault(_label, [0.0, 0.0])
                p[0] += time.perf_counter() - w
                p[1] += time.process_time() - c

        setattr(pl, name, wrapped)
    try:
        t = time.perf_counter()
        with dask_client("local", workers, dashboard_address=None) as client:
            start = time.perf_counter() - t
            c, w = time.process_time(), time.perf_counter()
            m = run_preprocess(
                fits_dir=sim / "fits",
                output_dir=out,
                reference_csv=sim / "X_FE.csv",
                prediction_csv=sim / "galah_X_FE.csv",
                settings=PipelineSettings(chunk_size=1000, format="zarr"),
                plots_dir=out / "plots" if plots else None,
                client=client,
                chunk_task=timed_chunk,
            )
            wall, cpu = time.perf_counter() - w, time.process_time() - c
    finally:
        for name, f in originals.items():
            setattr(pl, name, f)
    n = sum(v["matched_files"] for v in m["counts"].values() if isinstance(v, dict))
    chunks = [json.loads(p.read_text()) for p in sorted(timing.glob("*.json"))]
    return {"n": n, "wall": wall, "client_cpu": cpu, "cluster_start": start, "parts": parts, "chunks": chunks}


def report(r: dict[str, Any], workers: int) -> str:
    n, ch = r["n"], r["chunks"]
    cpu = sum(c["cpu"] for c in ch)
    lines = [
        f"N={n}: {r['wall']:.1f} s wall, {n / r['wall'] / workers:.1f} spectra/s/core "
        f"(cluster start {r['cluster_start']:.1f} s not counted); client CPU {r['client_cpu']:.1f} s; load "
        f"{os.getloadavg()[0]:.1f}",
        *(f"  client {k:36s} wall {w:6.2f} s  CPU {c:6.2f} s" for k, (w, c) in r["parts"].items()),
        f"  workers: {len(ch)} chunk tasks, CPU {cpu:.1f} s ({cpu / n * 1e3:.2f} ms/spectrum), system "
        f"{sum(c['sys'] for c in ch):.1f} s, {sum(c['minflt'] for c in ch)} page faults, wall "
        f"{sum(c['wall'] for c in ch):.1f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--plots", action="store_true", help="also draw the preprocessing plots")
    ap.add_argument("--work", type=Path, default=Path("preprocess-cluster-bench"))
    args = ap.parse_args()
    sim = args.work / f"sim{args.n}"
    if not (sim / "X_FE.csv").exists():
        from specabund.distributed import dask_client
        from specabund.simulate import simulate_dataset

        with dask_client("local", args.workers, dashboard_address=None) as client:
            simulate_dataset(args.n, sim, seed=1, client=client)
    for i in range(args.repeat):
        print(report(one_run(sim, args.work / f"out{i}", args.workers, args.plots), args.workers), flush=True)


if __name__ == "__main__":
    main()
