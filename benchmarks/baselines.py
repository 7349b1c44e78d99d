"""Benchmark of the baselines: fit time, prediction speed and test RMSE per model.

Spectra come from :mod:`specabund.simulate` when it is importable: labels from ``draw_labels`` (Galactic
sample) and noiseless continuum-normalised model flux on the LAMOST grid from ``normalized_model_flux``,
plus Gaussian noise at a g-band SNR drawn log-uniformly in 10-200 and 0.2 % dead pixels. This stands for
perfectly preprocessed spectra (the FITS -> preprocessing round trip is not part of this benchmark).
Otherwise a built-in generator of Gaussian absorption lines is used. The script prints which.

Usage::

    python benchmarks/baselines.py [--n 5000] [--elements C_FE MG_FE] [--threads N] [--compare-features]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from specabund.baselines import BoostingConfig, BoostingRegressor, CannonModel
from specabund.dataset import Dataset


def simulate_spectra(n: int, elements: list[str], seed: int) -> tuple[Dataset, str]:
    rng = np.random.default_rng(seed)
    try:
        from specabund.simulate import draw_labels, lamost_wavelength_grid, normalized_model_flux
    except ImportError:
        return builtin_spectra(n, elements, rng), "built-in Gaussian-line generator"
    labels = draw_labels(n, rng, independent=False)
    wl = lamost_wavelength_grid()
    flux = np.stack([normalized_model_flux(r, wl) for r in labels.to_dict("records")])
    snr = np.exp(rng.uniform(np.log(10), np.log(200), n))
    ds = _assemble(flux, wl, labels[elements].to_numpy(), elements, labels, snr, rng)
    return ds, "specabund.simulate (draw_labels + normalized_model_flux + noise)"


def builtin_spectra(n: int, elements: list[str], rng: np.random.Generator) -> Dataset:
    import pandas as pd

    wl = np.linspace(3900.0, 5800.0, 2000)
    lab = pd.DataFrame(
        {
            "teff": rng.uniform(4200, 6500, n),
            "logg": rng.uniform(1, 4.8, n),
            "fe_h": rng.normal(-0.3, 0.35, n),
        }
    )
    for e in elements:
        lab[e] = rng.normal(0.05, 0.15, n)
    t, g = (lab["teff"].to_numpy() - 5300) / 700, (lab["logg"].to_numpy() - 3) / 1.1
    flux = np.ones((n, wl.size))
    for _ in range(150):
        c, w = rng.uniform(wl[5], wl[-5]), rng.uniform(1.5, 4)
        owner = rng.integers(-1, len(elements))
        d = rng.uniform(0.05, 0.3) * np.exp(rng.normal(-0.3, 0.3) * t + rng.normal(0, 0.2) * g
                                            + rng.uniform(0.3, 1) * lab["fe_h"].to_numpy())  # fmt: skip
        if owner >= 0:
            d = d * np.exp(2.0 * lab[elements[owner]].to_numpy())
        flux -= np.clip(d, 0, 0.9)[:, None] * np.exp(-0.5 * ((wl - c) / w) ** 2)
    snr = np.exp(rng.uniform(np.log(10), np.log(200), n))
    return _assemble(flux, wl, lab[elements].to_numpy(), elements, lab, snr, rng)


def _assemble(flux, wl, y, elements, labels, snr, rng) -> Dataset:  # type: ignore[no-untyped-def]
    n = len(flux)
    X = (flux + rng.normal(size=flux.shape) / snr[:, None]).astype(np.float32)
    ivar = np.repeat((snr**2)[:, None], flux.shape[1], axis=1).astype(np.float32)
    bad = rng.random(X.shape) < 0.002
    X[bad], ivar[bad] = 0.0, 0.0
    names = np.array([f"sim{i}" for i in range(n)])
    return Dataset(
        X=X, ivar=ivar, wavelength=np.asarray(wl, dtype=float), y=np.asarray(y, dtype=np.float32),
        elements=list(elements), filenames=names, obsid=names, spec=names,
        teff=labels["teff"].to_numpy(np.float32), logg=labels["logg"].to_numpy(np.float32),
        fe_h=labels["fe_h"].to_numpy(np.float32), snr=snr.astype(np.float32),
        split=rng.choice([0, 1, 2], n, p=[0.7, 0.15, 0.15]).astype(np.int8), group=names,
    )  # fmt: skip


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--elements", nargs="+", default=["C_FE", "MG_FE"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compare-features", action="store_true", help="also run the trees on raw pixels")
    ap.add_argument("--models", nargs="+", default=["xgboost", "lightgbm", "cannon"])
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds, source = simulate_spectra(args.n, args.elements, args.seed)
    print(f"data: {source}; {len(ds)} spectra x {ds.n_pixels} pixels in {time.perf_counter() - t0:.1f} s")
    print(f"threads={args.threads} device={args.device}")
    tr, va, te = (ds.split == s for s in (0, 1, 2))
    print(f"train/val/test = {tr.sum()}/{va.sum()}/{te.sum()}")
    print(f"{'model':<18}{'element':<8}{'fit s':>9}{'pred spec/s':>13}{'test RMSE':>11}{'label std':>11}")
    variants: list[tuple[str, str]] = []
    for m in args.models:
        if m == "cannon":
            variants.append(("cannon", ""))
        else:
            variants.append((m, "pca"))
            if args.compare_features:
                variants.append((m, "raw"))
    for element in args.elements:
        j = ds.label_index(element)
        y = ds.y[:, j].astype(float)
        for kind, feat in variants:
            t0 = time.perf_counter()
            if kind == "cannon":
                names = ["TEFF", "LOGG", "FE_H", element]
                lab = np.column_stack([ds.teff, ds.logg, ds.fe_h, y])
                model = CannonModel(names).fit(ds.X[tr], ds.ivar[tr], lab[tr])
                fit_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                pred = model.predict_label(ds.X[te], ds.ivar[te], element)
            else:
                b = BoostingRegressor(
                    kind, BoostingConfig(features=feat), args.threads, args.device, args.seed
                )
                b.fit(ds.X[tr], ds.ivar[tr], y[tr], ds.X[va], ds.ivar[va], y[va])
                fit_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                pred = b.predict(ds.X[te], ds.ivar[te])
            pred_s = time.perf_counter() - t1
            name = kind if not feat else f"{kind}-{feat}"
            print(
                f"{name:<18}{element:<8}{fit_s:>9.2f}{te.sum() / pred_s:>13.0f}{rmse(pred, y[te]):>11.4f}"
                f"{np.std(y[te]):>11.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
