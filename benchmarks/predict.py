"""Prediction speed: spectra per second for a single pass and for 50 MC-Dropout samples, and peak memory.

Uses the default 'rescnn' architecture with *untrained* (freshly initialised) weights: speed does not
depend on the weight values. Spectra are random on the default preprocessing grid (3900-8900 A, 1e-4 dex).

    python benchmarks/predict.py --threads 2 --n 4096 --mc-n 256
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from specabund.models import build_model, default_config
from specabund.predict import predict_with_uncertainty
from specabund.preprocess import PreprocessOptions
from specabund.preprocess.steps import log_linear_grid
from specabund.training.data import LabelScaler
from specabund.training.saved import LoadedModel, grid_info

LABELS = ["C_FE", "MG_FE", "CA_FE", "TEFF", "LOGG", "FE_H"]


def make_model(name: str, n_pix: int, run_dir: Path) -> LoadedModel:
    mcfg = default_config(name)
    net = build_model(mcfg, n_pix, len(LABELS)).eval()
    wl = log_linear_grid(
        PreprocessOptions().wave_min, PreprocessOptions().wave_max, PreprocessOptions().log_step
    )
    cfg = {"wavelength": grid_info(wl), "preprocess_hash": "bench", "labels": LABELS}
    scaler = LabelScaler(mean=np.zeros(len(LABELS)), std=np.ones(len(LABELS)))
    return LoadedModel(
        model=net, run_dir=run_dir, config=cfg, labels=LABELS, scaler=scaler, model_config=mcfg
    )


def rate(model: LoadedModel, X: np.ndarray, iv: np.ndarray, k: int, bs: int, rows: int | None) -> float:
    predict_with_uncertainty(model, X[:bs], iv[:bs], n_samples=k, batch_size=bs, max_rows=rows)  # warm-up
    t = time.perf_counter()
    predict_with_uncertainty(model, X, iv, n_samples=k, batch_size=bs, max_rows=rows)
    return len(X) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096, help="spectra for the single-pass rate")
    ap.add_argument("--mc-n", type=int, default=256, help="spectra for the 50-sample rate")
    ap.add_argument("--model", default="rescnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = PreprocessOptions()
    n_pix = len(log_linear_grid(opts.wave_min, opts.wave_max, opts.log_step))
    rng = np.random.default_rng(0)
    X = (1 + 0.05 * rng.standard_normal((args.n, n_pix))).astype(np.float32)
    iv = np.full_like(X, 400.0)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.model, n_pix, Path(tmp))
        n_par = sum(p.numel() for p in model.model.parameters())
        print(f"model {args.model} (untrained), {n_par} parameters, {n_pix} pixels, {args.threads} threads")
        print("single pass (n_samples=1):")
        for bs in (64, 256, 512):
            print(f"  batch {bs:4d}: {rate(model, X, iv, 1, bs, None):8.0f} spectra/s")
        print("50 MC-Dropout samples:")
        for bs, rows in ((256, 256), (16, 512)):
            r = rate(model, X[: args.mc_n], iv[: args.mc_n], 50, bs, rows)
            print(f"  batch {bs:4d}, rows/forward {rows:4d}: {r:8.1f} spectra/s ({50 * r:8.0f} passes/s)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
