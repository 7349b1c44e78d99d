"""Simulated data sets laid out like the real project inputs: FITS files plus label catalogues."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from specabund.utils import atomic_write_text, process_map

from .labels import ABUNDANCE_ELEMENTS, draw_labels
from .synth import simulate_spectrum
from .writer import write_lamost_fits

__all__ = ["DATASET_LAYOUTS", "simulate_dataset"]

log = logging.getLogger(__name__)

#: Values of ``simulate_dataset(layout=...)``.
DATASET_LAYOUTS: tuple[str, ...] = ("mixed", "table", "image")

_TABLE_RELEASES = ("DR9", "DR10", "DR11")
_IMAGE_RELEASES = ("DR5", "DR6", "DR7", "DR8")


@dataclass(frozen=True)
class _Task:
    index: int
    seed: np.random.SeedSequence
    labels: dict[str, float]
    rv_kms: float
    obsid: int
    layout: str
    gzip: bool
    fits_dir: str


def _run_task(task: _Task) -> dict[str, Any]:
    rng = np.random.default_rng(task.seed)
    spec = simulate_spectrum(task.labels, rng, rv_kms=task.rv_kms)
    layout = task.layout
    if layout == "mixed":
        layout = "table" if rng.uniform() < 0.5 else "image"
    m = spec.meta
    m["obsid"] = task.obsid
    # the fibre number is tied to the index so that file names are unique within a data set
    m["fiberid"] = 1 + task.index % 250
    m["spid"] = 1 + (task.index // 250) % 16
    m["filename"] = f"spec-{m['mjd']}-{m['planid']}_sp{m['spid']:02d}-{m['fiberid']:03d}.fits"
    releases = _TABLE_RELEASES if layout == "table" else _IMAGE_RELEASES
    m["data_release"] = releases[int(rng.integers(0, len(releases)))]
    name = f"{task.obsid}.fits" if layout == "table" else m["filename"]
    path = write_lamost_fits(spec, Path(task.fits_dir) / name, layout=layout, gzip=task.gzip)
    return {
        "index": task.index,
        "spec": path.name,
        "obsid": task.obsid,
        "layout": layout,
        "rv": m["rv_kms"],
        "z": m["z"],
        "z_err": m["z_err"],
        "snr": m["snr_g"],
        **{f"snr_{b}": m[f"snr_{b}"] for b in "ugriz"},
        "ebv": m["ebv"],
        "npix": len(spec),
    }


def simulate_dataset(
    n: int,
    output_dir: str | Path,
    seed: int,
    *,
    layout: str = "mixed",
    gzip: bool = False,
    independent: bool = False,
    permuted: bool = False,
    prediction_fraction: float = 0.2,
    n_workers: int = 1,
    repeat_fraction: float = 0.05,
) -> dict[str, Any]:
    """Simulate ``n`` LAMOST spectra with known labels and write them like a real project input.

    Writes ``output_dir/fits/`` (``<obsid>.fits`` for the table layout,
    ``spec-<mjd>-<plan>_sp<nn>-<fiber>.fits`` for the image layout, ``.gz`` appended with ``gzip``),
    ``output_dir/X_FE.csv`` (reference catalogue),
    ``output_dir/galah_X_FE.csv`` (prediction catalogue: a disjoint set of stars, as in a GALAH cross-match)
    and ``output_dir/truth.csv`` (every file: labels, true rv, header z, S/N per band, layout, E(B-V),
    star ``group`` and ``subset``). Both catalogues have the columns ``spec, teff, logg, fe_h, <X>_FE...,
    snr, rv, group``; ``spec`` is the written file name, ``rv`` the true radial velocity (km/s), ``snr``
    the g-band S/N and ``group`` the star (shared by repeat observations).

    Parameters
    ----------
    n : int
        Number of spectra (files).
    output_dir : path
        Where to write.
    seed : int
        Master seed: labels come from one child of ``numpy.random.SeedSequence(seed)``, and every spectrum
        from its own grandchild, so the output does not depend on ``n_workers``.
    layout : {'mixed', 'table', 'image'}
        File layout; ``'mixed'`` picks one per file at random.
    gzip : bool
        Write ``.fits.gz``.
    independent : bool
        Draw labels independently and uniformly (see :func:`specabund.simulate.draw_labels`).
    permuted : bool
        Draw Galactic-looking labels, then shuffle each ``X_FE`` column independently across the stars:
        the same marginal distributions, but no correlation with Teff, logg, [Fe/H] or each other (the
        test set of ``benchmarks/leakage.py``: a model that reads [X/Fe] off correlated lines fails it).
    prediction_fraction : float
        Fraction of the stars that go to the prediction catalogue.
    n_workers : int
        Processes used to simulate and write.
    repeat_fraction : float
        Fraction of the files that are second observations of a star already in the set.

    Returns
    -------
    dict
        Summary: counts (spectra, stars, reference and prediction rows, repeat groups, files per
        layout), paths and timing.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if layout not in DATASET_LAYOUTS:
        raise ValueError(f"layout must be one of {DATASET_LAYOUTS}, not {layout!r}")
    if not 0.0 <= prediction_fraction < 1.0:
        raise ValueError(f"prediction_fraction must be in [0, 1), got {prediction_fraction}")
    if not 0.0 <= repeat_fraction <= 0.5:
        raise ValueError(f"repeat_fraction must be in [0, 0.5], got {repeat_fraction}")
    t0 = time.perf_counter()
    out = Path(output_dir)
    fits_dir = out / "fits"
    fits_dir.mkdir(parents=True, exist_ok=True)

    root = np.random.SeedSequence(seed)
    label_seq, file_seq = root.spawn(2)
    rng = np.random.default_rng(label_seq)
    n_repeat = round(repeat_fraction * n) if n >= 4 else 0
    n_stars = n - n_repeat
    if independent and permuted:
        raise ValueError("independent and permuted exclude each other")
    labels = draw_labels(n_stars, rng, independent=independent)
    if permuted:
        for col in [c for c in labels.columns if c.endswith("_FE")]:
            labels[col] = rng.permutation(labels[col].to_numpy())
    star_rv = rng.normal(0.0, 45.0, n_stars)
    star_of_file = np.concatenate([np.arange(n_stars), rng.choice(n_stars, n_repeat, replace=False)])
    in_prediction = rng.uniform(size=n_stars) < prediction_fraction
    if prediction_fraction > 0 and n_stars >= 2 and not in_prediction.any():
        in_prediction[int(rng.integers(0, n_stars))] = True
    if in_prediction.all() and n_stars >= 2:
        in_prediction[int(rng.integers(0, n_stars))] = False
    obsids = 100_000_000 + 1000 * np.arange(n) + rng.integers(0, 1000, n)
    seeds = file_seq.spawn(n)

    tasks = [
        _Task(
            index=i,
            seed=seeds[i],
            labels={k: float(v) for k, v in labels.iloc[int(star_of_file[i])].items()},
            rv_kms=float(star_rv[star_of_file[i]]),
            obsid=int(obsids[i]),
            layout=layout,
            gzip=gzip,
            fits_dir=str(fits_dir),
        )
        for i in range(n)
    ]
    with process_map(n_workers, batch_size=max(1, n // (8 * max(n_workers, 1)))) as pmap:
        rows = list(pmap(_run_task, tasks))

    files = pd.DataFrame(rows).sort_values("index").reset_index(drop=True)
    star = star_of_file
    lab = labels.iloc[star].reset_index(drop=True)
    group_size = np.bincount(star, minlength=n_stars)[star]
    truth = pd.concat([files[["spec", "obsid"]], lab], axis=1)
    truth["group"] = star
    truth["group_size"] = group_size
    truth["subset"] = np.where(in_prediction[star], "prediction", "reference")
    for col in (
        "rv",
        "z",
        "z_err",
        "snr",
        "snr_u",
        "snr_g",
        "snr_r",
        "snr_i",
        "snr_z",
        "ebv",
        "layout",
        "npix",
    ):
        truth[col] = files[col].to_numpy()
    cat_cols = [
        "spec",
        "teff",
        "logg",
        "fe_h",
        *(f"{e}_FE" for e in ABUNDANCE_ELEMENTS),
        "snr",
        "rv",
        "group",
    ]
    ref = truth.loc[truth["subset"] == "reference", cat_cols]
    pred = truth.loc[truth["subset"] == "prediction", cat_cols]
    atomic_write_text(out / "X_FE.csv", ref.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "galah_X_FE.csv", pred.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "truth.csv", truth.to_csv(index=False, float_format="%.8g"))
    elapsed = time.perf_counter() - t0
    summary = {
        "n_spectra": n,
        "n_stars": n_stars,
        "n_reference": len(ref),
        "n_prediction": len(pred),
        "n_repeat_groups": int((np.bincount(star, minlength=n_stars) > 1).sum()),
        "layouts": {k: int(v) for k, v in files["layout"].value_counts().items()},
        "gzip": gzip,
        "independent": independent,
        "permuted": permuted,
        "seed": seed,
        "output_dir": str(out),
        "fits_dir": str(fits_dir),
        "elapsed_s": elapsed,
        "spectra_per_s": n / elapsed if elapsed > 0 else float("inf"),
    }
    log.info("simulated %d spectra in %.1f s into %s", n, elapsed, out)
    return summary
