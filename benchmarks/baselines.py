"""Benchmark of the baselines next to the CNN: fit time, prediction speed and test RMSE per model.

Uses the same data as ``benchmarks/train.py``: N simulated LAMOST FITS files (SNR 10-200), preprocessed
once by the pipeline and cached under --cache-dir (shared with the training benchmark), with the same
train/val/test split. For every element it fits, with the defaults of ``specabund baseline``:

* XGBoost and LightGBM on 64 PCA components (``--compare-features`` adds raw pixels), early stopping on
  the validation split;
* the Cannon: regional cubic models with censoring, the training-label prior and the continuum correction
  (``CannonSettings()``), and, for reference, the classic global quadratic Cannon (maximum likelihood,
  censored, no continuum correction).

The CNN row comes from the model that ``benchmarks/train.py`` left in the cache (same N and seed): its
test RMSE and inference speed on the same test split. Without it, the CNN row says how to make it.

    python benchmarks/baselines.py                      # N = 5000, the training benchmark's data
    python benchmarks/baselines.py --n 600 --elements MG_FE
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import DEFAULT_LABELS, THREADS, _preprocess, _simulate

from specabund.baselines import (
    BoostingConfig,
    BoostingRegressor,
    CannonSettings,
    RegionalCannon,
    cannon_label_names,
    label_column,
)
from specabund.dataset import Dataset, load_dataset


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def cannon_models(ds: Dataset, element: str, train: np.ndarray) -> list[tuple[str, object, list[str]]]:
    """The default Cannon of ``specabund baseline`` and the classic one, set up on the training labels."""
    names = cannon_label_names(ds, element)
    lab = np.column_stack([label_column(ds, n) for n in names])
    lab = lab[train & np.all(np.isfinite(lab), axis=1)]
    default = CannonSettings().build(names, lab, ds.wavelength)
    classic = CannonSettings(order=2, regions=1, prior=False, continuum_pixels=0).build(
        names, lab, ds.wavelength
    )
    k = len(default.regions) if isinstance(default, RegionalCannon) else 1
    return [(f"cannon-regional{k}", default, names), ("cannon-classic", classic, names)]


def cnn_predictions(run_dir: Path, ds: Dataset, te: np.ndarray) -> tuple[float, np.ndarray, list[str]] | None:
    """Speed (spectra/s), test predictions and labels of the training benchmark's CNN, if it exists."""
    if not (run_dir / "model.safetensors").exists():
        return None
    from specabund.training import load_model

    model = load_model(run_dir, "cpu")
    model.predict(ds.X[te][:8], ds.ivar[te][:8])  # warm-up
    t0 = time.perf_counter()
    pred, _ = model.predict(ds.X[te], ds.ivar[te], batch_size=256)
    return te.sum() / (time.perf_counter() - t0), pred, list(model.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="simulated spectra (as benchmarks/train.py)")
    ap.add_argument("--seed", type=int, default=2024, help="simulation seed (as benchmarks/train.py)")
    ap.add_argument("--elements", nargs="+", default=["C_FE", "MG_FE", "CA_FE"])
    ap.add_argument("--threads", type=int, default=THREADS, help="threads of the tree models")
    ap.add_argument("--compare-features", action="store_true", help="also run the trees on raw pixels")
    ap.add_argument("--models", nargs="+", default=["xgboost", "lightgbm", "cannon"])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/specabund_bench_train"))
    args = ap.parse_args()

    elements = [lab[:-3] for lab in DEFAULT_LABELS if lab.endswith("_FE")]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sim = _simulate(args.n, args.seed, args.cache_dir)
    ds = load_dataset(_preprocess(sim, elements, args.cache_dir))
    tr, va, te = (ds.split == s for s in (0, 1, 2))
    print(
        f"data: {len(ds)} spectra x {ds.n_pixels} pixels; train/val/test = {tr.sum()}/{va.sum()}/{te.sum()}"
    )
    print(f"tree threads={args.threads}")
    hi = ds.snr > 50
    head = f"{'model':<20}{'element':<8}{'fit s':>9}{'pred spec/s':>13}{'RMSE':>9}{'RMSE>50':>9}{'std':>8}"
    print(head)
    cnn = cnn_predictions(args.cache_dir / f"run_{sim.name}", ds, te)
    for element in args.elements:
        y = label_column(ds, element).astype(float)
        fin = np.isfinite(y)
        test = te & fin
        variants: list[tuple[str, object, list[str] | None]] = []
        for m in args.models:
            if m == "cannon":
                variants += cannon_models(ds, element, tr & fin)
            else:
                feats = ["pca", "raw"] if args.compare_features else ["pca"]
                for f in feats:
                    b = BoostingRegressor(m, BoostingConfig(features=f), args.threads, "cpu", 1)
                    variants.append((f"{m}-{f}", b, None))
        for name, model, names in variants:
            t0 = time.perf_counter()
            if names is not None:  # a Cannon: all its labels must be finite in training
                lab = np.column_stack([label_column(ds, n) for n in names])
                fit_rows = tr & np.all(np.isfinite(lab), axis=1)
                model.fit(ds.X[fit_rows], ds.ivar[fit_rows], lab[fit_rows])  # type: ignore[attr-defined]
            else:
                a, v = tr & fin, va & fin
                model.fit(ds.X[a], ds.ivar[a], y[a], ds.X[v], ds.ivar[v], y[v])  # type: ignore[attr-defined]
            fit_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            if names is not None:
                pred = model.predict_label(ds.X[test], ds.ivar[test], element)  # type: ignore[attr-defined]
            else:
                pred = model.predict(ds.X[test], ds.ivar[test])  # type: ignore[attr-defined]
            pred_s = time.perf_counter() - t1
            h = hi[test]
            print(
                f"{name:<20}{element:<8}{fit_s:>9.1f}{test.sum() / pred_s:>13.0f}{rmse(pred, y[test]):>9.4f}"
                f"{rmse(pred[h], y[test][h]):>9.4f}{np.std(y[test]):>8.4f}",
                flush=True,
            )
        if cnn is not None and element in cnn[2]:
            speed, p_all, labels = cnn
            p, yt, h = p_all[fin[te], labels.index(element)], y[test], hi[test]
            print(
                f"{'cnn (train.py)':<20}{element:<8}{'-':>9}{speed:>13.0f}{rmse(p, yt):>9.4f}"
                f"{rmse(p[h], yt[h]):>9.4f}{np.std(yt):>8.4f}"
            )
        else:
            print(f"{'cnn':<20}{element:<8}  no trained model for it: run benchmarks/train.py --n {args.n}")


if __name__ == "__main__":
    main()
