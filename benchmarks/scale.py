"""Survey scale: simulate N spectra, preprocess them to Zarr on a Dask LocalCluster, train one epoch
streaming from the store, predict with uncertainties in parts; speed per core and peak memory per process.

For every size N (``--sizes``, default 10000 30000 100000) each stage runs in a fresh Python process, so
the peak resident memory (``ru_maxrss``) printed is that stage's own:

``simulate``    ``simulate_dataset(N, client=...)``: one task per 500 files on ``--workers`` Dask workers.
``preprocess``  ``run_preprocess(format='zarr', client=...)``: one task per chunk of ``--chunk-size`` files.
``train``       one epoch of ``--model`` on ``train_dataset.zarr`` (streamed, chunk-buffered) in the client
                process with ``--workers`` torch threads; validation on ``val_dataset.zarr``, streamed. The
                time includes the abundance swap's set-up (once per run), printed apart.
``predict``     ``predict_in_parts`` on ``prediction_dataset.zarr``: one task per part of ``--part-rows``
                spectra, ``--mc-samples`` MC-Dropout samples (the trained one-epoch model).

Speed is spectra per second per core (``N_stage / wall / cores``; cores = ``--workers``). Memory: the
client process, the scheduler (a LocalCluster's scheduler runs inside the client process, so these two
are the same process) and each worker process, in MB. Everything runs at ``nice`` priority when started
with it; results go to ``--work`` (kept with ``--keep``).

    nice python benchmarks/scale.py --sizes 2000 10000
    python benchmarks/scale.py --sizes 100000 --workers 8 --work /scratch/scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _client(workers: int) -> Any:
    from specabund.distributed import dask_client

    return dask_client("local", workers, dashboard_address=None)


def stage(name: str, n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in this process; return its timing and peak memory."""
    import torch

    from specabund.distributed import process_peak_rss

    sim, pre, run, pred = work / "sim", work / "processed", work / "model", work / "predictions"
    out: dict[str, Any] = {"stage": name, "n": n}
    if name == "train":
        from specabund.dataset import load_dataset
        from specabund.models.registry import default_config
        from specabund.training import TrainConfig, train

        torch.set_num_threads(args.workers)
        tr, va = load_dataset(pre / "train_dataset.zarr"), load_dataset(pre / "val_dataset.zarr")
        labels = [e for e in tr.elements if e.endswith("_FE")] + ["TEFF", "LOGG", "FE_H"]
        labels = [lab for lab in labels if lab in tr.elements]
        t = time.perf_counter()
        train(
            tr,
            va,
            labels,
            default_config(args.model),
            TrainConfig(epochs=1, batch_size=64, device="cpu"),
            run,
            overwrite=True,
        )
        out.update(seconds=time.perf_counter() - t, spectra=len(tr) + len(va), client_mb=_rss_mb())
        swap = json.loads((run / "config.json").read_text()).get("abundance_swap")
        if swap:  # the responses are computed once per run, before the first epoch
            out["swap_setup_s"] = swap["setup_seconds"]
        return out
    with _client(args.workers) as client:
        t = time.perf_counter()
        if name == "simulate":
            from specabund.simulate import simulate_dataset

            simulate_dataset(n, sim, seed=1, client=client)
            out["spectra"] = n
        elif name == "preprocess":
            from specabund.preprocess import PipelineSettings, run_preprocess

            m = run_preprocess(
                fits_dir=sim / "fits",
                output_dir=pre,
                reference_csv=sim / "X_FE.csv",
                prediction_csv=sim / "galah_X_FE.csv",
                settings=PipelineSettings(chunk_size=args.chunk_size, format="zarr"),
                client=client,
            )
            out["spectra"] = sum(c["matched_files"] for c in m["counts"].values() if isinstance(c, dict))
            store = [p for d in pre.glob("*_dataset.zarr") for p in d.rglob("*") if p.is_file()]
            out["store_mb"] = sum(p.stat().st_size for p in store) / 2**20
        elif name == "predict":
            from specabund.predict.parts import predict_in_parts

            s = predict_in_parts(
                pre / "prediction_dataset.zarr",
                run,
                pred,
                part_rows=args.part_rows,
                n_samples=args.mc_samples,
                batch_size=64,
                client=client,
            )
            out["spectra"] = s["n_input"]
        else:
            raise SystemExit(f"unknown stage {name}")
        out["seconds"] = time.perf_counter() - t
        peaks = process_peak_rss(client)
    out["client_mb"] = _rss_mb()
    out["scheduler_mb"] = peaks.pop("scheduler")
    out["workers_mb"] = [peaks[k] for k in sorted(peaks)]
    return out


STAGES = ("simulate", "preprocess", "train", "predict")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000])
    ap.add_argument("--workers", type=int, default=2, help="Dask workers (= cores used)")
    ap.add_argument("--chunk-size", type=int, default=1000)
    ap.add_argument("--part-rows", type=int, default=500)
    ap.add_argument("--mc-samples", type=int, default=50)
    ap.add_argument("--model", default="rescnn")
    ap.add_argument("--work", type=Path, default=None, help="working folder [a temporary one]")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    if args.stage:  # child process: one stage
        res = stage(args.stage, args.sizes[0], args.work, args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    root = args.work or Path(tempfile.mkdtemp(prefix="specabund-scale-"))
    rows: list[dict[str, Any]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        for n in args.sizes:
            work = root / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            for st in STAGES:
                cmd = [sys.executable, __file__, "--stage", st, "--sizes", str(n), "--work", str(work)]
                cmd += ["--workers", str(args.workers), "--chunk-size", str(args.chunk_size)]
                cmd += ["--part-rows", str(args.part_rows), "--mc-samples", str(args.mc_samples)]
                cmd += ["--model", args.model]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not line:
                    sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
                    raise SystemExit(f"stage {st} at N={n} failed ({p.returncode})")
                res = json.loads(line[0][7:])
                res["per_core"] = res["spectra"] / res["seconds"] / args.workers
                rows.append(res)
                print(_row(res), flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(rows, args.workers))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _row(r: dict[str, Any]) -> str:
    w = " ".join(f"{v:.0f}" for v in r.get("workers_mb", []))
    store = f"  stores on disk {r['store_mb']:.0f} MB" if "store_mb" in r else ""
    if "swap_setup_s" in r:
        store += f"  (of which abundance-swap set-up {r['swap_setup_s']:.0f} s)"
    return (
        f"N={r['n']:>7} {r['stage']:<10} {r['spectra']:>7} spectra {r['seconds']:8.1f} s "
        f"{r['per_core']:8.1f} spectra/s/core  client {r['client_mb']:.0f} MB  workers [{w}] MB{store}"
    )


def table(rows: list[dict[str, Any]], workers: int) -> str:
    head = (
        f"| N | stage | spectra | wall s | spectra/s/core ({workers} cores) | client+scheduler MB "
        "| workers MB (peak each) |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        w = ", ".join(f"{v:.0f}" for v in r.get("workers_mb", [])) or "-"
        lines.append(
            f"| {r['n']} | {r['stage']} | {r['spectra']} | {r['seconds']:.1f} | {r['per_core']:.1f} "
            f"| {r['client_mb']:.0f} | {w} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
