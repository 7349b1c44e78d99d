"""Small synthetic datasets shared by the test modules (no files, no simulator round trip)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specabund.dataset import Dataset


def noisy_dataset(
    flux: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    wavelength: np.ndarray,
    rng: np.random.Generator,
    *,
    snr_range: tuple[float, float],
    split: np.ndarray | None = None,
    teff: np.ndarray | None = None,
    logg: np.ndarray | None = None,
    fe_h: np.ndarray | None = None,
    prefix: str = "s",
    preprocess_hash: str = "synth-v1",
) -> Dataset:
    """A :class:`Dataset` of ``flux`` plus white noise at a per-spectrum SNR drawn from ``snr_range``.

    ``ivar`` is SNR**2 everywhere; names are ``<prefix><index>``; ``split`` defaults to all-train and the
    stellar parameters to NaN.
    """
    n = len(flux)
    snr = rng.uniform(*snr_range, n).astype(np.float32)
    X = (flux + rng.normal(size=flux.shape) / snr[:, None]).astype(np.float32)
    ivar = np.repeat((snr**2)[:, None], flux.shape[1], axis=1).astype(np.float32)
    names = np.array([f"{prefix}{i:05d}" for i in range(n)])
    nan = np.full(n, np.nan, dtype=np.float32)

    def _f32(a: np.ndarray | None) -> np.ndarray:
        return nan if a is None else np.asarray(a, dtype=np.float32)

    return Dataset(
        X=X,
        ivar=ivar,
        wavelength=wavelength,
        y=np.asarray(y, dtype=np.float32),
        elements=list(labels),
        filenames=names,
        obsid=names,
        spec=names,
        teff=_f32(teff),
        logg=_f32(logg),
        fe_h=_f32(fe_h),
        snr=snr,
        split=np.zeros(n, dtype=np.int8) if split is None else np.asarray(split, dtype=np.int8),
        group=names,
        preprocess_hash=preprocess_hash,
    )


def split_70_15_15(n: int) -> np.ndarray:
    """Split codes: first 70% train, next 15% validation, last 15% test."""
    split = np.zeros(n, dtype=np.int8)
    split[int(0.7 * n) : int(0.85 * n)] = 1
    split[int(0.85 * n) :] = 2
    return split


def saturating_lines(wavelength: np.ndarray, y: np.ndarray, n_lines: int) -> np.ndarray:
    """Noiseless flux: Gaussian lines of a fixed random line list, line ``i`` owned by label ``i % L``,
    optical depth growing as exp(2.3 y_owner) so that depths saturate."""
    lines = np.random.default_rng(1234)
    centres = np.sort(lines.uniform(wavelength[10], wavelength[-10], n_lines))
    owner = np.arange(n_lines) % y.shape[1]
    strength = lines.uniform(0.3, 1.2, n_lines)
    width = 2.6 * (wavelength[1] - wavelength[0])
    prof = np.exp(-0.5 * ((wavelength[None, :] - centres[:, None]) / width) ** 2)
    return np.exp(-(strength[None, :] * np.exp(2.3 * y[:, owner])) @ prof)


def simulated_workdir(root: Path, n: int, seed: int) -> Path:
    """A workdir with ``n`` simulated reference spectra in ``sim/`` preprocessed into ``processed_data/``."""
    from specabund.preprocess import PipelineSettings, run_preprocess
    from specabund.simulate import simulate_dataset

    simulate_dataset(n, root / "sim", seed=seed, prediction_fraction=0.0)
    run_preprocess(
        fits_dir=root / "sim" / "fits",
        output_dir=root / "processed_data",
        reference_csv=root / "sim" / "X_FE.csv",
        settings=PipelineSettings(chunk_size=max(n, 1)),
    )
    return root
