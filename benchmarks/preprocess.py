"""End-to-end preprocessing throughput: read + clean + rest frame + resample + normalise + write.

Simulates N LAMOST files once (cached under --cache-dir), then runs ``specabund preprocess`` with 1 and 2
workers (no cache, so every file is processed) and prints spectra per second, per core, and the peak
resident memory of the whole process tree.

    python benchmarks/preprocess.py [--n 5000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _simulate(n: int, cache: Path) -> Path:
    out = cache / f"sim{n}"
    if not (out / "X_FE.csv").exists():
        from specabund.simulate import simulate_dataset

        t0 = time.perf_counter()
        simulate_dataset(
            n, out, seed=123, layout="mixed", prediction_fraction=0.0, n_workers=os.cpu_count() or 1
        )
        print(f"simulated {n} files in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def _peak_tree_rss(proc: psutil.Process, stop: threading.Event, result: list[int]) -> None:
    peak = 0
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    result.append(peak)


def run(sim: Path, workers: int, chunk_size: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as work:
        cmd = [
            sys.executable, "-m", "specabund.cli", "--workdir", work, "preprocess",
            "--reference-csv", str(sim / "X_FE.csv"), "--fits-dir", str(sim / "fits"),
            "--output-dir", "out", "--n-workers", str(workers), "--no-cache", "--chunk-size", str(chunk_size),
            "--no-plots",
        ]  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "MPLBACKEND": "Agg"}
        )
        stop, res = threading.Event(), []
        th = threading.Thread(target=_peak_tree_rss, args=(psutil.Process(p.pid), stop, res))
        th.start()
        _, err = p.communicate()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        if p.returncode:
            raise SystemExit(err.decode()[-2000:])
        return dt, res[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-size", type=int, default=1000)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "specabund-bench")
    a = ap.parse_args()
    sim = _simulate(a.n, a.cache_dir)
    print(f"{'workers':>8}{'wall s':>10}{'spectra/s':>12}{'per core':>12}{'peak RSS MB':>14}")
    for w in a.workers:
        dt, peak = run(sim, w, a.chunk_size)
        rate = a.n / dt
        print(f"{w:>8}{dt:>10.1f}{rate:>12.0f}{rate / w:>12.0f}{peak / 2**20:>14.0f}")
    print("(wall time includes interpreter start-up, catalogue matching, writing the datasets and the")
    print(" validation report; the stage plots are off (--no-plots): they cost a fixed few seconds)")


if __name__ == "__main__":
    main()
