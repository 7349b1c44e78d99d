"""Out-of-distribution checks: labels outside the training range and spectra unlike the training set.

MC-Dropout is overconfident far from the training data, so predictions there are flagged rather than
trusted. Two spectral statistics are measured in the space of the principal components of the training
spectra (the network input: flux with pixels without data set to the continuum, clipped like
:func:`specabund.training.data.prepare_input`):

``mahalanobis``
    ``sqrt(sum_j score_j**2 / lambda_j)`` over the first ``k`` components (``lambda_j`` their variance in
    the training set): how unusual the spectrum is *within* the space the training set spans.
``residual``
    mean over pixels with data of ``(x - x_reconstructed)**2 / (1/ivar + floor**2)``, the reduced chi-square
    of the ``k``-component reconstruction (``floor`` = 0.01 continuum units keeps very high-SNR spectra
    from dominating): how far the spectrum lies *outside* that space, e.g. a flat line, an emission-line
    object, a badly normalised or a non-stellar spectrum.

Each statistic's threshold is the ``percentile`` (default 99.5th) of its distribution over the reference
(training, else validation) spectra; a spectrum above either is flagged. A label prediction outside
``[min, max]`` of the training labels (plus ``margin`` times the label's standard deviation) is flagged too.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpecabundError
from ..training.data import FLUX_MAX, FLUX_MIN
from ..utils import atomic_savez, fill_bad_pixels, usable_pixels

logger = logging.getLogger(__name__)

RESIDUAL_FLOOR = 0.01


def network_view(X: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flux as the network sees it (no-data pixels at the continuum, clipped) minus 1, and a good mask."""
    f = np.clip(fill_bad_pixels(X, ivar, dtype=np.float64), FLUX_MIN, FLUX_MAX) - 1.0
    return f, usable_pixels(np.asarray(X, dtype=np.float64), ivar)


@dataclass
class SpectralOOD:
    """PCA reference of the training spectra and the thresholds of the two OOD statistics.

    Attributes
    ----------
    mean : numpy.ndarray
        ``(P,)`` mean network-view spectrum.
    components : numpy.ndarray
        ``(k, P)`` principal axes.
    variances : numpy.ndarray
        ``(k,)`` variance of the reference scores along each axis.
    mahalanobis_threshold, residual_threshold : float
        ``percentile`` of each statistic over the reference spectra.
    percentile : float
        Percentile used for the thresholds.
    n_reference : int
        Spectra the reference was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    mahalanobis_threshold: float
    residual_threshold: float
    percentile: float
    n_reference: int

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        ivar: np.ndarray,
        *,
        n_components: int = 16,
        percentile: float = 99.5,
        max_spectra: int = 20000,
        rng: np.random.Generator | None = None,
    ) -> SpectralOOD:
        """Fit the PCA reference on ``X``/``ivar`` (at most ``max_spectra``, drawn with ``rng``)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        n = len(X)
        if n < 3:
            raise SpecabundError(f"the OOD reference needs at least 3 spectra, got {n}")
        idx = np.sort(rng.choice(n, max_spectra, replace=False)) if n > max_spectra else np.arange(n)
        f, _ = network_view(X[idx], ivar[idx])
        k = max(1, min(int(n_components), len(idx) - 1, f.shape[1]))
        # scikit-learn's randomized PCA (as the tree baselines' features); the seed comes from ``rng``
        from sklearn.decomposition import PCA

        seed = int(rng.integers(2**31 - 1))
        pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(f)
        mean = pca.mean_
        comps = pca.components_
        variances = np.maximum(pca.explained_variance_, 1e-12)
        ood = cls(
            mean=mean,
            components=comps,
            variances=variances,
            mahalanobis_threshold=np.inf,
            residual_threshold=np.inf,
            percentile=float(percentile),
            n_reference=len(idx),
        )
        d, r = ood.score(X[idx], ivar[idx])
        ood.mahalanobis_threshold = float(np.percentile(d, percentile))
        ood.residual_threshold = float(np.percentile(r[np.isfinite(r)], percentile))
        return ood

    def score(self, X: np.ndarray, ivar: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Mahalanobis distance and reconstruction reduced chi-square of each spectrum, ``(N,)`` each.

        A spectrum without any pixel with data has an infinite residual.
        """
        n = len(X)
        dist = np.empty(n)
        resid = np.empty(n)
        for s in range(0, n, chunk):
            x = np.asarray(X[s : s + chunk])
            iv = np.asarray(ivar[s : s + chunk])
            # network_view(x, iv) and the statistics of the docstring, element for element the same
            # arithmetic, in place on two float64 buffers (this runs on every predicted spectrum)
            good = usable_pixels(x, iv)
            bad = ~good
            A = x.astype(np.float64)
            A[bad] = 1.0
            np.clip(A, FLUX_MIN, FLUX_MAX, out=A)
            A -= 1.0
            A -= self.mean
            scores = A @ self.components.T
            dist[s : s + chunk] = np.sqrt(np.sum(scores**2 / self.variances, axis=1))
            A -= scores @ self.components  # the reconstruction residual
            var = iv.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                np.divide(1.0, var, out=var)
                var += RESIDUAL_FLOOR**2
                np.square(A, out=A)
                A /= var  # chi**2 per pixel; pixels without data count 0
            A[bad] = 0.0
            ngood = good.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                resid[s : s + chunk] = np.where(ngood > 0, A.sum(axis=1) / np.maximum(ngood, 1), np.inf)
        return dist, resid

    def flags(self, X: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(mahalanobis, residual, far_mahalanobis, far_residual)`` for each spectrum."""
        d, r = self.score(X, ivar)
        return d, r, d > self.mahalanobis_threshold, r > self.residual_threshold

    def save(self, path: str | Path) -> None:
        """Write the reference as an npz (atomic)."""
        atomic_savez(
            path,
            mean=self.mean,
            components=self.components,
            variances=self.variances,
            thresholds=np.array([self.mahalanobis_threshold, self.residual_threshold]),
            percentile=np.array(self.percentile),
            n_reference=np.array(self.n_reference),
        )

    @classmethod
    def load(cls, path: str | Path) -> SpectralOOD:
        """Read a reference written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    mean=z["mean"],
                    components=z["components"],
                    variances=z["variances"],
                    mahalanobis_threshold=float(z["thresholds"][0]),
                    residual_threshold=float(z["thresholds"][1]),
                    percentile=float(z["percentile"]),
                    n_reference=int(z["n_reference"]),
                )
        except (OSError, KeyError, ValueError, IndexError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise SpecabundError(f"{path}: not a readable OOD reference ({exc})") from exc

    def summary(self) -> dict[str, Any]:
        return {
            "n_components": len(self.variances),
            "percentile": self.percentile,
            "mahalanobis_threshold": self.mahalanobis_threshold,
            "residual_threshold": self.residual_threshold,
            "n_reference": self.n_reference,
        }


def label_range(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label ``(min, max)`` of ``y`` (N, L), ignoring NaN (NaN for a label without values)."""
    y = np.asarray(y, dtype=np.float64)
    lo = np.full(y.shape[1], np.nan)
    hi = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        v = y[:, j][np.isfinite(y[:, j])]
        if v.size:
            lo[j], hi[j] = v.min(), v.max()
    return lo, hi


def out_of_range(pred: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(N, L)`` boolean: prediction below ``lo`` or above ``hi`` (NaN bounds never flag)."""
    pred = np.asarray(pred, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        below = np.isfinite(lo) & (pred < lo)
        above = np.isfinite(hi) & (pred > hi)
    return below | above
