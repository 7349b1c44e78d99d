"""Training benchmark of the default model, measured against the Cramer-Rao information limit.

Simulates N LAMOST spectra (SNR 10-200, default ``simulate_dataset`` settings) and preprocesses them once
(cached under --cache-dir), then on 2 CPU threads trains the default model of the default configuration
(``[model]`` and ``[training]`` of ``specabund/data/default.toml``, device cpu) to early stopping (or the
--epochs cap) and prints:

* time per epoch and the training time to early stop;
* test-set RMSE per label, overall and at SNR > 50;
* the median Cramer-Rao bound at SNR > 50 (``specabund.evaluation.crb``, marginalised over every simulator
  label) and the ratio RMSE / median bound, against the issue's targets ([Mg/Fe], [Ca/Fe] <= 0.04 dex,
  [C/Fe] <= 0.06 dex, ratio < 2; meant for the full N = 5000 run);
* inference speed (spectra per second, one pass over the test set on the CPU).

    python benchmarks/train.py                 # N = 5000 (slow: tens of minutes to hours on 2 cores)
    python benchmarks/train.py --quick         # N = 600, 6 epochs: a smoke run
    python benchmarks/train.py --n 2000 --epochs 40 --crb-mode pipeline
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import build_configs, default_sections

DEFAULT_LABELS = ("C_FE", "MG_FE", "CA_FE", "TEFF", "LOGG", "FE_H")
TARGETS = {"MG_FE": 0.04, "CA_FE": 0.04, "C_FE": 0.06}
MAX_RATIO = 2.0
THREADS = 2


def _simulate(n: int, seed: int, cache: Path) -> Path:
    out = cache / f"sim_n{n}_seed{seed}"
    if not (out / "truth.csv").exists():
        from specabund.simulate import simulate_dataset

        t0 = time.perf_counter()
        simulate_dataset(n, out, seed=seed, prediction_fraction=0.0, n_workers=THREADS)
        print(f"simulated {n} spectra in {time.perf_counter() - t0:.1f} s -> {out}")
    else:
        print(f"simulation cached: {out}")
    return out


def _preprocess(sim: Path, elements: list[str], cache: Path) -> Path:
    from specabund.preprocess import PipelineSettings, run_preprocess
    from specabund.preprocess.pipeline import PIPELINE_VERSION

    # the pipeline version in the name: a changed pipeline never reuses stale preprocessed data
    out = cache / f"pre_{sim.name}_{'_'.join(elements) or 'all'}_v{PIPELINE_VERSION}"
    if not (out / "reference_dataset.npz").exists():
        t0 = time.perf_counter()
        run_preprocess(
            fits_dir=sim / "fits",
            output_dir=out,
            reference_csv=sim / "X_FE.csv",
            settings=PipelineSettings(n_workers=THREADS, elements=elements or None),
        )
        print(f"preprocessed in {time.perf_counter() - t0:.1f} s -> {out}")
    else:
        print(f"preprocessed data cached: {out}")
    return out / "reference_dataset.npz"


def _configs(epochs_cap: int | None, early_stopping: int | None) -> tuple[object, object]:
    m, t = default_sections(report_ignored=True)
    t.update(device="cpu", num_threads=THREADS)
    if epochs_cap is not None:
        t["epochs"] = min(int(t.get("epochs", epochs_cap)), epochs_cap)
    if early_stopping is not None:
        t["early_stopping"] = early_stopping
    return build_configs(m, t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="simulated spectra [5000; 600 with --quick]")
    ap.add_argument("--epochs", type=int, default=None, help="cap on the epochs [config; 6 with --quick]")
    ap.add_argument("--early-stopping", type=int, default=None, help="patience [config]")
    ap.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS), help="labels to train and test")
    ap.add_argument("--quick", action="store_true", help="N = 600 and 6 epochs: a smoke run")
    ap.add_argument("--seed", type=int, default=2024, help="simulation seed")
    ap.add_argument("--crb-mode", choices=("model", "pipeline"), default="model")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/specabund_bench_train"))
    args = ap.parse_args(argv)
    n = args.n or (600 if args.quick else 5000)
    epochs = args.epochs if args.epochs is not None else (6 if args.quick else None)

    from specabund.dataset import load_dataset
    from specabund.elements import STELLAR_PARAMETERS, normalize_label
    from specabund.evaluation.crb import cramer_rao_bounds, information_limit_table, load_truth
    from specabund.training import load_model, train

    torch.set_num_threads(THREADS)
    labels = [normalize_label(x) for x in args.labels]
    elements = [lab[:-3] for lab in labels if lab not in STELLAR_PARAMETERS]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sim = _simulate(n, args.seed, args.cache_dir)
    ds = load_dataset(_preprocess(sim, elements, args.cache_dir))
    missing = [lab for lab in labels if lab not in ds.elements]
    if missing:
        print(f"labels {missing} not in the dataset (has {ds.elements})", file=sys.stderr)
        return 2
    tr, va, te = ds.split_subset("train"), ds.split_subset("val"), ds.split_subset("test")
    print(f"spectra: {len(ds)} (train {len(tr)}, val {len(va)}, test {len(te)}), {ds.n_pixels} pixels")

    model_cfg, train_cfg = _configs(epochs, args.early_stopping)
    print(f"model: {model_cfg}")
    print(f"training: {train_cfg}")
    run_dir = args.cache_dir / f"run_{sim.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = train(tr, va, labels, model_cfg, train_cfg, run_dir, overwrite=True)
    t_train = time.perf_counter() - t0
    ep = res.history["epoch_time_s"].to_numpy(dtype=float)
    print(
        f"\ntraining: {res.epochs_run} epochs ({'early stop' if res.stopped_early else 'epoch cap'}), "
        f"best epoch {res.best_epoch}, total {t_train:.1f} s; time per epoch: median {np.median(ep):.2f} s "
        f"(first {ep[0]:.2f} s, {len(tr)} training spectra, {THREADS} threads)"
    )

    model = load_model(run_dir, "cpu")
    model.predict(te.X[:8], te.ivar[:8])  # warm-up
    t0 = time.perf_counter()
    pred, _ = model.predict(te.X, te.ivar, batch_size=256)
    t_inf = time.perf_counter() - t0
    print(
        f"inference: {len(te) / t_inf:.0f} spectra/s ({len(te)} test spectra, batch 256, {THREADS} threads)"
    )

    y_true = np.column_stack([te.y[:, te.elements.index(lab)] for lab in model.labels])
    truth = load_truth(sim / "truth.csv", te)
    t0 = time.perf_counter()
    bounds = cramer_rao_bounds(truth, te.ivar, te.wavelength, list(model.labels), mode=args.crb_mode)
    t_crb = time.perf_counter() - t0
    print(f"Cramer-Rao bounds ({args.crb_mode} mode): {t_crb:.1f} s for {len(te)} stars")
    tab = information_limit_table(
        y_true, pred, bounds, te.snr, list(model.labels), snr_bins=(0.0, 50.0, np.inf)
    )

    print(f"\n{'label':>7} {'RMSE all':>9} {'RMSE>50':>9} {'CRB>50':>9} {'ratio>50':>9} {'n>50':>5}  target")
    ok = True
    for lab in model.labels:
        rows = tab[tab["label"] == lab].set_index("snr_bin")
        allr, hi = rows.loc["all"], rows.loc[">50"]
        target = TARGETS.get(lab)
        verdict = ""
        if target is not None:
            passed = hi["rmse"] <= target and hi["ratio"] < MAX_RATIO
            ok &= bool(passed)
            verdict = f"RMSE<={target:g}, ratio<{MAX_RATIO:g}: {'met' if passed else 'NOT met'}"
        print(
            f"{lab:>7} {allr['rmse']:9.4g} {hi['rmse']:9.4g} {hi['median_bound']:9.4g} {hi['ratio']:9.2f} "
            f"{int(hi['n']):5d}  {verdict}"
        )
    print(f"\ntargets (meant for the full N=5000 run): {'all met' if ok else 'not all met'}")
    if os.environ.get("SPECABUND_BENCH_TABLE"):
        print(tab.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
