"""Leakage benchmark: does the network read [X/Fe] from the element's lines, or from Teff/logg/[Fe/H]?

Trains the default model (``[model]``/``[training]`` of the default configuration, or ``--model-dir`` to use
an existing run) on ``benchmarks/train.py``'s data (5000 simulated spectra with Galactic-looking labels:
thin/thick disc and halo, the [alpha/Fe] knee), then tests it on

* the Galactic test split (same label correlations as in training), and
* a *permuted* set (``simulate_dataset(permuted=True)``): Galactic stars whose [X/Fe] columns are each
  shuffled across the stars, so the abundances keep their distribution but carry no correlation with
  Teff, logg, [Fe/H] or each other. A model that measures the lines does about as well there; one that
  restates the training correlations does worse than guessing the mean.

Printed per abundance (SNR > 50 unless ``--snr-min``): RMSE on both sets and their ratio (target <= 1.3);
the labels-only baseline (LightGBM on the true Teff, logg, [Fe/H], trained on the same training split) on
both sets and the model's ratio to it (target <= 0.6 on the Galactic set); the spread of the permuted labels
(the score of a model that ignores the spectrum); the own-line importance fraction and its enrichment over
chance (integrated gradients, ``specabund.analysis``; target >= 2.5 for MG_FE and CA_FE); and the Pearson
correlation between the importance spectra of every pair of labels (target < 0.7).

    python benchmarks/leakage.py                          # trains 40 epochs (tens of minutes on 2 cores)
    python benchmarks/leakage.py --model-dir RUN          # an existing run trained on train.py's data
    python benchmarks/leakage.py --n-perm 400 --epochs 8  # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import build_configs, default_sections
from ablation import _bounds
from train import _preprocess, _simulate

ABUNDANCES = ("C_FE", "MG_FE", "CA_FE")
LABELS = (*ABUNDANCES, "TEFF", "LOGG", "FE_H")
STELLAR = ("teff", "logg", "fe_h")


def _permuted_set(n: int, seed: int, cache: Path, threads: int) -> Any:
    from specabund.dataset import load_dataset
    from specabund.preprocess import PipelineSettings, run_preprocess
    from specabund.simulate import simulate_dataset

    sim = cache / f"perm_n{n}_seed{seed}"
    if not (sim / "truth.csv").exists():
        simulate_dataset(n, sim, seed=seed, permuted=True, prediction_fraction=0.0, n_workers=threads)
    out = cache / f"pre_{sim.name}"
    if not (out / "reference_dataset.npz").exists():
        run_preprocess(
            fits_dir=sim / "fits",
            output_dir=out,
            reference_csv=sim / "X_FE.csv",
            settings=PipelineSettings(n_workers=threads, elements=[a[:-3] for a in ABUNDANCES]),
        )
    return load_dataset(out / "reference_dataset.npz")


def _train(args: argparse.Namespace, tr: Any, va: Any) -> Path:
    from specabund.training import train

    if args.model_dir is not None:
        return args.model_dir
    m, t = default_sections()
    t.update(device="cpu", num_threads=args.threads, epochs=args.epochs, plot_every=10**6)
    if args.swap_prob is not None:
        t["augment"] = {**t.get("augment", {}), "swap_prob": args.swap_prob}
    model_cfg, train_cfg = build_configs(m, t)
    tag = "" if args.swap_prob is None else f"_swap{args.swap_prob:g}"
    run = args.cache_dir / f"leak_run_e{args.epochs}{tag}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    train(tr, va, list(LABELS), model_cfg, train_cfg, run)
    print(f"trained in {time.perf_counter() - t0:.0f} s -> {run}")
    return run


def _labels_only(tr: Any, sets: dict[str, Any], threads: int) -> dict[str, dict[str, np.ndarray]]:
    from specabund.baselines import BoostingConfig, BoostingRegressor

    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in sets}
    cfg = BoostingConfig(features="given", early_stopping_rounds=0, n_rounds=400)
    F = np.column_stack([getattr(tr, c) for c in STELLAR])
    for lab in ABUNDANCES:
        m = BoostingRegressor("lightgbm", cfg, n_threads=threads, seed=1)
        m.fit(F, None, tr.y[:, tr.elements.index(lab)])
        for name, ds in sets.items():
            out[name][lab] = m.predict(np.column_stack([getattr(ds, c) for c in STELLAR]))
    return out


def _importance(model: Any, ds: Any, n: int, steps: int) -> dict[str, np.ndarray]:
    from specabund.analysis.importance import LabelMean, integrated_gradients

    idx = np.argsort(-ds.snr)[:n]  # the best spectra: importance of the lines, not of the noise
    out = {}
    for lab in ABUNDANCES:
        attr, _, _ = integrated_gradients(LabelMean(model, lab), ds.X[idx], ds.ivar[idx], n_steps=steps)
        out[lab] = np.abs(attr).mean(axis=0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="training simulation (train.py's data when 5000)")
    ap.add_argument("--n-perm", type=int, default=1000, help="spectra of the permuted test set")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument(
        "--swap-prob", type=float, default=None, help="abundance-swap augmentation (default: the config's)"
    )
    ap.add_argument("--model-dir", type=Path, default=None, help="use this trained run instead of training")
    ap.add_argument("--snr-min", type=float, default=50.0)
    ap.add_argument("--n-importance", type=int, default=64, help="spectra for the importance spectra")
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2024, help="simulation seed of the training set")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/specabund_bench_train"))
    args = ap.parse_args(argv)

    from specabund.analysis.explain import explain_importance
    from specabund.dataset import load_dataset
    from specabund.training import load_model

    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sim = _simulate(args.n, args.seed, args.cache_dir)
    ds = load_dataset(_preprocess(sim, [a[:-3] for a in ABUNDANCES], args.cache_dir))
    tr, va, te = ds.split_subset("train"), ds.split_subset("val"), ds.split_subset("test")
    perm = _permuted_set(args.n_perm, args.seed + 7919, args.cache_dir, args.threads)
    sets = {"galactic": te, "permuted": perm}
    print(f"train {len(tr)}, val {len(va)}, Galactic test {len(te)}, permuted {len(perm)}")

    model = load_model(_train(args, tr, va), "cpu")
    preds = {name: model.predict(s.X, s.ivar, batch_size=256)[0] for name, s in sets.items()}
    lo = _labels_only(tr, sets, args.threads)
    imp = _importance(model, te, args.n_importance, args.ig_steps)

    def rmse(name: str, lab: str, pred: np.ndarray) -> float:
        s = sets[name]
        y = s.y[:, s.elements.index(lab)]
        ok = np.isfinite(y) & np.isfinite(pred) & (s.snr > args.snr_min)
        return float(np.sqrt(np.mean((pred[ok] - y[ok]) ** 2)))

    print(f"\nSNR > {args.snr_min:g}, RMSE in dex")
    head = (
        f"{'label':>6} {'CNN gal':>8} {'CNN perm':>9} {'perm/gal':>9} {'LO gal':>7} {'LO perm':>8} "
        f"{'CNN/LO gal':>11} {'perm std':>9} {'own frac':>9} {'enrich':>7}"
    )
    print(head)
    for lab in ABUNDANCES:
        j = model.labels.index(lab)
        g, p = rmse("galactic", lab, preds["galactic"][:, j]), rmse("permuted", lab, preds["permuted"][:, j])
        lg, lp = rmse("galactic", lab, lo["galactic"][lab]), rmse("permuted", lab, lo["permuted"][lab])
        yp = perm.y[:, perm.elements.index(lab)]
        spread = float(np.nanstd(yp[perm.snr > args.snr_min]))
        ex = explain_importance(lab, te.wavelength, imp[lab])
        print(
            f"{lab:>6} {g:8.4f} {p:9.4f} {p / g:9.2f} {lg:7.4f} {lp:8.4f} {g / lg:11.2f} {spread:9.4f} "
            f"{ex.own_fraction:9.3f} {ex.enrichment:7.2f}"
        )
    bounds = _bounds(sim, te, args.cache_dir)
    print("\nGalactic test split: RMSE by SNR and the ratio to the median Cramer-Rao bound at SNR > 50")
    print(f"{'label':>6} {'SNR<20':>8} {'SNR>100':>8} {'>100/<20':>9} {'>50':>8} {'CRB>50':>8} {'x CRB':>6}")
    for lab in LABELS:
        j = model.labels.index(lab)
        y = te.y[:, te.elements.index(lab)]
        r = preds["galactic"][:, j] - y
        ok = np.isfinite(r)
        lo, hi, vhi = ok & (te.snr < 20), ok & (te.snr > 50), ok & (te.snr > 100)
        e_lo, e_hi, e_vhi = (float(np.sqrt(np.mean(r[m] ** 2))) for m in (lo, hi, vhi))
        crb = float(np.median(bounds[hi, LABELS.index(lab)]))
        ratio = e_vhi / e_lo
        print(f"{lab:>6} {e_lo:8.4f} {e_vhi:8.4f} {ratio:9.2f} {e_hi:8.4f} {crb:8.4f} {e_hi / crb:6.2f}")
    print("\nPearson r of the importance spectra")
    for a, b in itertools.combinations(ABUNDANCES, 2):
        print(f"  {a} - {b}: {np.corrcoef(imp[a], imp[b])[0, 1]:.3f}")
    print(
        "\ntargets: perm/gal <= 1.3; CNN/LO gal <= 0.6; enrichment >= 2.5 (MG_FE, CA_FE); "
        "importance correlation < 0.7"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
