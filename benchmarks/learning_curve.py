"""Learning curve of the default model: test RMSE against the number of training spectra.

Simulates one pool of spectra (default ``simulate_dataset`` settings: Galactic-like labels, SNR 10-200),
preprocesses it once with the default pipeline (cached under --cache-dir), and trains the default model
of the default configuration on the first N spectra of its training split for each N of --sizes, with the
same validation set (at most --n-val spectra) and the same test set (at most --n-test spectra) for every N.
Prints, per N: the training time and the test RMSE at SNR > 50 per label, and the [Mg/Fe] and [Ca/Fe]
RMSE at SNR < 20 and SNR > 100. With --cannon, the default Cannon of ``specabund baseline`` (regional,
censored) is fitted on the same N training spectra for each abundance and its test RMSE at SNR > 50
printed beside the CNN's, with their ratio: does the network pull ahead of the Cannon with more data?
--reuse takes a CNN already trained in the cache for that N and epochs instead of training it again.

    python benchmarks/learning_curve.py --sizes 2000 5000 20000 --epochs 20 20 10
    python benchmarks/learning_curve.py --sizes 2000 5000 20000 --epochs 20 20 10 --reuse --cannon
    python benchmarks/learning_curve.py --sizes 300 600 --epochs 3 --pool 1200     # a smoke run
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import build_configs, default_sections
from train import _preprocess, _simulate

LABELS = ("C_FE", "MG_FE", "CA_FE", "TEFF", "LOGG", "FE_H")
ABUNDANCES = ("C_FE", "MG_FE", "CA_FE")


def _rmse(pred: np.ndarray, true: np.ndarray, sel: np.ndarray) -> float:
    ok = sel & np.isfinite(true)
    return float(np.sqrt(np.mean((pred[ok] - true[ok]) ** 2))) if ok.any() else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000], help="training spectra")
    ap.add_argument("--epochs", type=int, nargs="+", default=[20], help="epochs, one or one per size")
    ap.add_argument("--pool", type=int, default=None, help="simulated spectra [max size / 0.7, rounded up]")
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training run")
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/specabund_bench_lc"))
    ap.add_argument("--cannon", action="store_true", help="also fit the regional Cannon on each N")
    ap.add_argument("--reuse", action="store_true", help="reuse a CNN trained before for the same N, epochs")
    args = ap.parse_args(argv)
    epochs = args.epochs * len(args.sizes) if len(args.epochs) == 1 else args.epochs
    if len(epochs) != len(args.sizes):
        ap.error("give one --epochs value or one per size")

    from specabund.dataset import load_dataset
    from specabund.training import load_model, train

    torch.set_num_threads(args.threads)
    pool = args.pool or math.ceil(max(args.sizes) / 0.7 / 1000) * 1000
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    # simulated and preprocessed once, cached (benchmarks/train.py's helpers: 2 workers)
    ds = load_dataset(
        _preprocess(_simulate(pool, args.seed, args.cache_dir), ["C", "MG", "CA"], args.cache_dir)
    )
    tr, va, te = ds.split_subset("train"), ds.split_subset("val"), ds.split_subset("test")
    va = va.subset(np.arange(min(len(va), args.n_val)))
    te = te.subset(np.arange(min(len(te), args.n_test)))
    print(f"pool {len(ds)} spectra: train split {len(tr)}, validation {len(va)}, test {len(te)}")
    model_sec, train_sec = default_sections()
    y_true = np.column_stack([te.y[:, te.elements.index(lab)] for lab in LABELS])
    snr = np.asarray(te.snr)
    rows = []
    for n, ep in zip(args.sizes, epochs, strict=True):
        if n > len(tr):
            print(f"N={n}: only {len(tr)} training spectra in the pool; skipped")
            continue
        t = dict(train_sec, device="cpu", num_threads=args.threads, epochs=ep)
        mcfg, tcfg = build_configs(model_sec, t)
        run = args.cache_dir / f"run_n{n}_e{ep}"
        t0 = time.perf_counter()
        if args.reuse and (run / "model.safetensors").exists():
            secs = float("nan")  # trained before
        else:
            shutil.rmtree(run, ignore_errors=True)
            train(tr.subset(np.arange(n)), va, list(LABELS), mcfg, tcfg, run, overwrite=True)
            secs = time.perf_counter() - t0
        pred, _ = load_model(run, "cpu").predict(te.X, te.ivar, batch_size=256)
        hi = snr > 50
        row = {"n": n, "epochs": ep, "minutes": secs / 60}
        for j, lab in enumerate(LABELS):
            row[lab] = _rmse(pred[:, j], y_true[:, j], hi)
        for lab in ("MG_FE", "CA_FE"):
            j = LABELS.index(lab)
            row[f"{lab}<20"] = _rmse(pred[:, j], y_true[:, j], snr < 20)
            row[f"{lab}>100"] = _rmse(pred[:, j], y_true[:, j], snr > 100)
        if args.cannon:
            for lab in ABUNDANCES:
                row[f"cannon {lab}"] = _cannon_rmse(tr.subset(np.arange(n)), te, lab, hi)
        rows.append(row)
        print(
            f"N={n:6d} {ep:3d} epochs {secs / 60:6.1f} min | SNR>50: "
            + " ".join(f"{lab} {row[lab]:.4g}" for lab in LABELS)
            + f" | Mg <20/>100 {row['MG_FE<20']:.3f}/{row['MG_FE>100']:.3f}"
            + f" Ca <20/>100 {row['CA_FE<20']:.3f}/{row['CA_FE>100']:.3f}",
            flush=True,
        )
    print(f"\ntest set: {len(te)} spectra, {int((snr > 50).sum())} at SNR > 50")
    head = f"{'N':>6} {'epochs':>6} {'min':>6} " + " ".join(f"{lab:>7}" for lab in LABELS)
    print(head)
    for r in rows:
        values = " ".join(f"{r[lab]:7.4g}" for lab in LABELS)
        print(f"{r['n']:6d} {r['epochs']:6d} {r['minutes']:6.1f} {values}")
    if args.cannon:
        print("\nregional Cannon on the same training spectra, test RMSE at SNR > 50 (CNN / Cannon)")
        print(f"{'N':>6} " + " ".join(f"{lab:>18}" for lab in ABUNDANCES))
        for r in rows:
            cells = " ".join(
                f"{r[f'cannon {lab}']:>10.4g} ({r[lab] / r[f'cannon {lab}']:5.2f})" for lab in ABUNDANCES
            )
            print(f"{r['n']:6d} {cells}")
    return 0


def _cannon_rmse(tr: Any, te: Any, element: str, sel: np.ndarray) -> float:
    """Test RMSE of ``specabund baseline``'s default Cannon for ``element`` fitted on ``tr``."""
    from specabund.baselines import CannonSettings, cannon_label_names, label_column

    names = cannon_label_names(tr, element)
    lab = np.column_stack([label_column(tr, name) for name in names])
    fit = np.all(np.isfinite(lab), axis=1)
    model = CannonSettings().build(names, lab[fit], tr.wavelength)
    model.fit(tr.X[fit], tr.ivar[fit], lab[fit])
    pred = model.predict_label(te.X, te.ivar, element)
    return _rmse(pred, label_column(te, element).astype(float), sel)


if __name__ == "__main__":
    raise SystemExit(main())
