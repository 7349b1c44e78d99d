"""Feature preparation for the tree baselines: a PCA reduction saved as npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataMismatchError, SpecabundError
from ..utils import atomic_savez, fill_bad_pixels


@dataclass
class PCAReducer:
    """Linear projection onto principal components, stored as plain arrays.

    Fitted with :class:`sklearn.decomposition.PCA` but applied with numpy, so a saved reducer reloads from
    an ``.npz`` without pickle or scikit-learn objects.

    Attributes
    ----------
    components : ndarray, shape (K, P)
        Principal axes (rows).
    mean : ndarray, shape (P,)
        Per-pixel mean of the (filled) training flux.
    explained_variance_ratio : ndarray, shape (K,)
        Fraction of the variance carried by each component.
    """

    components: np.ndarray
    mean: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, X: np.ndarray, ivar: np.ndarray | None, n_components: int, seed: int = 0) -> PCAReducer:
        """Fit on the training flux (bad pixels filled with 1.0 first).

        ``n_components`` is capped at ``min(N, P)``; randomized SVD with ``random_state=seed`` keeps it
        deterministic.
        """
        from sklearn.decomposition import PCA

        Xf = fill_bad_pixels(X, ivar)
        k = int(min(n_components, Xf.shape[0], Xf.shape[1]))
        if k < 1:
            raise SpecabundError("PCA needs at least one spectrum and one pixel")
        pca = PCA(n_components=k, svd_solver="randomized", random_state=seed)
        pca.fit(Xf)
        return cls(
            components=pca.components_.astype(np.float32),
            mean=pca.mean_.astype(np.float32),
            explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
        )

    def transform(self, X: np.ndarray, ivar: np.ndarray | None = None) -> np.ndarray:
        """Project spectra (bad pixels filled with 1.0) onto the components; returns (N, K) float32."""
        Xf = fill_bad_pixels(X, ivar)
        if Xf.shape[1] != self.mean.shape[0]:
            raise DataMismatchError(
                f"spectra have {Xf.shape[1]} pixels, the PCA expects {self.mean.shape[0]}"
            )
        # float64 products: a float32 GEMM's summation order (and so its last bits) depends on the
        # memory alignment and thread count, which made saved-and-reloaded PCAs differ by ~1e-5
        centred = Xf.astype(np.float64) - self.mean.astype(np.float64)
        return (centred @ self.components.T.astype(np.float64)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write ``components``, ``mean`` and ``explained_variance_ratio`` to an npz atomically."""
        atomic_savez(
            path,
            components=self.components,
            mean=self.mean,
            explained_variance_ratio=self.explained_variance_ratio,
        )

    @classmethod
    def load(cls, path: str | Path) -> PCAReducer:
        """Read a reducer written by :meth:`save` (``allow_pickle=False``)."""
        path = Path(path)
        if not path.exists():
            raise SpecabundError(f"{path}: PCA file not found")
        with np.load(path, allow_pickle=False) as z:
            return cls(
                components=z["components"],
                mean=z["mean"],
                explained_variance_ratio=z["explained_variance_ratio"],
            )
