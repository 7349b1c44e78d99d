"""Ablation of the default network: each suspect of the accuracy gap switched alone.

On the data of ``benchmarks/train.py`` (N simulated LAMOST spectra, SNR 10-200, preprocessed by the
pipeline, the same split and cache) this trains one network per variant with the library's ``train`` on 2
CPU threads, for the same number of epochs, and prints per abundance label the test RMSE at SNR > 50, its
ratio to the median Cramer-Rao bound at SNR > 50 (model mode, cached), and the RMSE at SNR < 20 and > 100
(a noise-limited model's error falls with SNR). Every variant starts from the *baseline* configuration
(``--baseline``: ``old`` = the defaults before the ablation, ``default`` = the current defaults) and
changes one thing; ``all`` changes every listed suspect at once.

Results are kept per variant in ``<cache>/ablation/<baseline>_<variant>_e<epochs>_n<N>_p<pipeline>.json``
(the pipeline version of the preprocessed data): a rerun skips the finished variants (delete the file to
redo one).

    python benchmarks/ablation.py                         # N = 5000, 40 epochs, every variant (hours)
    python benchmarks/ablation.py --variants old mse      # a subset
    python benchmarks/ablation.py --n 1200 --epochs 8     # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import build_configs, default_sections
from train import _preprocess, _simulate

THREADS = 2
ABUNDANCES = ("C_FE", "MG_FE", "CA_FE")
LABELS = (*ABUNDANCES, "TEFF", "LOGG", "FE_H")

#: The model and training configuration before the ablation (the seed defaults).
OLD_MODEL: dict[str, Any] = dict(
    stem_channels=32,
    stem_kernel_size=9,
    stem_stride=2,
    group_channels=(32, 64, 96),
    blocks_per_group=1,
    kernel_size=5,
    dropout=0.1,
    pool_bins=8,
    head_hidden=128,
    head_dropout=0.1,
)
OLD_TRAIN: dict[str, Any] = dict(loss="nll", learning_rate=1e-3, augment={"noise_prob": 0.5, "rv_prob": 0.5})

#: One suspect each: (model overrides, training overrides, augmentation overrides).
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "baseline": ({}, {}, {}),
    "loss_mse": ({}, {"loss": "mse"}, {}),
    "loss_beta_nll": ({}, {"loss": "beta_nll", "beta": 0.5}, {}),
    "no_block_dropout": ({"dropout": 0.0}, {}, {}),
    "no_augment": ({}, {}, {"enabled": False}),
    "no_noise_rv_augment": ({}, {}, {"noise_prob": 0.0, "rv_prob": 0.0}),
    "pool_32": ({"pool_bins": 32}, {}, {}),
    "lr_3e-3": ({}, {"learning_rate": 3e-3}, {}),
    "deeper_k7": ({"kernel_size": 7, "blocks_per_group": 2}, {}, {}),
    # the "plain CNN": small channels, kernel 7, no dropout in the trunk, MSE, one-cycle to 3e-3,
    # no augmentation (within what ModelConfig expresses: a stride-2 stem and three stride-2 groups)
    "plainlike": (
        {
            "stem_channels": 16,
            "stem_kernel_size": 7,
            "group_channels": (32, 48, 64),
            "kernel_size": 7,
            "dropout": 0.0,
            "pool_bins": 8,
        },
        {"loss": "mse", "learning_rate": 3e-3},
        {"enabled": False},
    ),
    "all": (
        {"dropout": 0.0, "pool_bins": 32},
        {"loss": "mse", "learning_rate": 3e-3},
        {"noise_prob": 0.0, "rv_prob": 0.0},
    ),
    # "all" with beta-NLL instead of the MSE mean loss (keeps precision weighting between labels)
    "all_beta_nll": (
        {"dropout": 0.0, "pool_bins": 32},
        {"loss": "beta_nll", "beta": 0.5, "learning_rate": 3e-3},
        {"noise_prob": 0.0, "rv_prob": 0.0},
    ),
}


def _configs(baseline: str, variant: str, epochs: int) -> tuple[Any, Any]:
    m, t = default_sections()
    aug = dict(t.pop("augment", {}) or {})
    if baseline == "old":
        m.update(OLD_MODEL)
        old = dict(OLD_TRAIN)
        aug = dict(old.pop("augment"))
        t.update(old)
    mo, to, ao = VARIANTS[variant]
    m.update(mo)
    t.update(to)
    aug.update(ao)
    t.update(device="cpu", num_threads=THREADS, epochs=epochs, early_stopping=0, plot_every=10**6)
    t["augment"] = aug
    return build_configs(m, t)


def _bounds(sim: Path, te: Any, cache: Path) -> np.ndarray:
    from specabund.evaluation.crb import cramer_rao_bounds, load_truth

    path = cache / f"crb_{sim.name}_{len(te)}.npy"
    if path.exists():
        return np.load(path)
    t0 = time.perf_counter()
    b = cramer_rao_bounds(load_truth(sim / "truth.csv", te), te.ivar, te.wavelength, list(LABELS))
    b = np.asarray(b, dtype=np.float64)
    np.save(path, b)
    print(f"Cramer-Rao bounds: {time.perf_counter() - t0:.0f} s for {len(te)} stars (cached in {path})")
    return b


def _scores(te: Any, pred: np.ndarray, labels: list[str], bounds: np.ndarray) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for j, lab in enumerate(labels):
        y = te.y[:, te.elements.index(lab)]
        r = pred[:, j] - y
        ok = np.isfinite(r)
        hi, lo, vhi = ok & (te.snr > 50), ok & (te.snr < 20), ok & (te.snr > 100)
        rmse = {
            k: float(np.sqrt(np.mean(r[m] ** 2))) for k, m in (("gt50", hi), ("lt20", lo), ("gt100", vhi))
        }
        crb = float(np.median(bounds[hi, LABELS.index(lab)]))
        out[lab] = {**rmse, "crb_gt50": crb, "ratio_gt50": rmse["gt50"] / crb}
    return out


def run_variant(
    args: argparse.Namespace, variant: str, tr: Any, va: Any, te: Any, bounds: np.ndarray
) -> dict:
    from specabund.preprocess.pipeline import PIPELINE_VERSION
    from specabund.training import load_model, train

    name = f"{args.baseline}_{variant}_e{args.epochs}_n{args.n}_p{PIPELINE_VERSION}.json"
    out = args.cache_dir / "ablation" / name
    if out.exists():
        return json.loads(out.read_text())
    model_cfg, train_cfg = _configs(args.baseline, variant, args.epochs)
    run_dir = args.cache_dir / "ablation" / f"run_{args.baseline}_{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = train(tr, va, list(LABELS), model_cfg, train_cfg, run_dir, overwrite=True)
    t_train = time.perf_counter() - t0
    model = load_model(run_dir, "cpu")
    pred, _ = model.predict(te.X, te.ivar, batch_size=256)
    result = {
        "variant": variant,
        "baseline": args.baseline,
        "epochs": args.epochs,
        "best_epoch": res.best_epoch,
        "train_s": t_train,
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "scores": _scores(te, pred, list(model.labels), bounds),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def print_table(results: list[dict]) -> None:
    head = f"{'variant':<22}" + "".join(f"{lab + ' >50 (xCRB)':>20}" for lab in ABUNDANCES)
    head += f"{'MG <20/>100':>14}{'CA <20/>100':>14}{'TEFF>50':>9}{'LOGG>50':>9}{'FEH>50':>8}{'min':>6}"
    print(head)
    for r in results:
        s = r["scores"]
        line = f"{r['variant']:<22}"
        for lab in ABUNDANCES:
            line += f"{s[lab]['gt50']:>12.4f} ({s[lab]['ratio_gt50']:4.1f}x)"
        for lab in ("MG_FE", "CA_FE"):
            line += f"{s[lab]['lt20']:>7.3f}/{s[lab]['gt100']:.3f}"
        line += f"{s['TEFF']['gt50']:>9.0f}{s['LOGG']['gt50']:>9.3f}{s['FE_H']['gt50']:>8.3f}"
        line += f"{r['train_s'] / 60:>6.0f}"
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="simulated spectra (train.py's data when 5000)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--baseline", choices=("old", "default"), default="old")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=2024, help="simulation seed")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (1 on a shared machine)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/specabund_bench_train"))
    args = ap.parse_args(argv)

    from specabund.dataset import load_dataset

    globals()["THREADS"] = args.threads
    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sim = _simulate(args.n, args.seed, args.cache_dir)
    ds = load_dataset(_preprocess(sim, [lab[:-3] for lab in ABUNDANCES], args.cache_dir))
    tr, va, te = ds.split_subset("train"), ds.split_subset("val"), ds.split_subset("test")
    print(f"spectra: train {len(tr)}, val {len(va)}, test {len(te)}; {args.epochs} epochs; {THREADS} threads")
    bounds = _bounds(sim, te, args.cache_dir)
    results = []
    for v in args.variants:
        results.append(run_variant(args, v, tr, va, te, bounds))
        print(f"\n[{len(results)}/{len(args.variants)}] {v} done")
        print_table(results)
    print(
        "\nRMSE in dex (TEFF in K) on the test split; (x CRB): ratio to the median Cramer-Rao bound, SNR > 50"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
