"""A regional Cannon: one polynomial Cannon per region of the stellar-parameter space.

One quadratic or cubic polynomial cannot follow the flux of every pixel from 3900 K dwarfs to 7000 K
dwarfs and metal-poor giants: line strengths change by orders of magnitude over that range, and an
abundance label then absorbs what the stellar parameters leave over. Users of The Cannon handle this by
training separate models on parts of the Kiel diagram (giants and dwarfs, or narrow Teff ranges). This
module does that automatically:

* The training labels of the *region labels* (by default the stellar parameters TEFF, LOGG, FE_H, i.e. all
  labels that are not ``X_FE`` abundances) are standardised and split into ``n_regions`` clusters by
  k-means (seeded, k-means++ start). Each training spectrum belongs to its ``overlap`` nearest cluster
  centres, so neighbouring regions share spectra and the models agree near the borders.
* Each region has its own :class:`~specabund.baselines.cannon.CannonModel` (default cubic, with the same
  censoring), trained on its members; a global model of ``finder_order`` (default quadratic) is trained on
  all spectra and only serves to find the region of a new spectrum.
* Inference: the finder's labels pick the nearest region; that region's model infers the labels; where
  those labels lie nearer another region, that region's model infers them again (one reassignment).
* A region with fewer than ``min_train`` training spectra (default twice its coefficients per pixel) is
  not used: its spectra go to the nearest usable region.

The partition is fixed from the whole training label set before any spectrum is accumulated
(:meth:`RegionalCannon.set_regions`), so batch training (:meth:`~RegionalCannon.partial_fit` per batch,
then :meth:`~RegionalCannon.solve`) gives exactly the model of one fit over all spectra, as for the single
Cannon. The model saves as one ``.npz`` without pickle; :func:`load_cannon` reads either kind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataMismatchError, SpecabundError
from ..utils import atomic_savez
from .cannon import CannonModel, accumulators_from_arrays, censored_element, read_npz

logger = logging.getLogger(__name__)

#: Intrinsic-scatter grid of the regional models: coarser than the single Cannon's, because every grid
#: value costs one set of normal equations per region (the accuracy is the same within the noise).
REGIONAL_SCATTER_GRID: tuple[float, ...] = (0.0, 0.002, 0.005, 0.01, 0.03, 0.1)


def auto_n_regions(n_train: int, per_region: int = 400, max_regions: int = 8) -> int:
    """Default number of regions: one per ``per_region`` training spectra, between 1 and ``max_regions``."""
    return int(min(max(n_train // per_region, 1), max_regions))


class RegionalCannon:
    """Cannon models per k-means region of the stellar labels, plus a global model that picks the region.

    Parameters
    ----------
    label_names : list of str
        Labels every model fits jointly (e.g. ``['TEFF', 'LOGG', 'FE_H', 'MG_FE']``).
    label_mean, label_scale : ndarray, optional
        Label standardisation shared by all models (default: from the labels given to
        :meth:`set_regions` or the first :meth:`partial_fit`).
    n_regions : int
        Number of k-means regions (reduced when there are fewer distinct training points).
    order : int
        Polynomial order of the regional models.
    finder_order : int
        Polynomial order of the global model that picks the region.
    overlap : int
        Each training spectrum trains the models of its ``overlap`` nearest regions.
    region_labels : list of str, optional
        Labels that define the regions (default: every label that is not an ``X_FE`` abundance, or all
        labels when there is none).
    scatter_grid, ridge, bound_margin, censor
        As for :class:`~specabund.baselines.cannon.CannonModel`, used by every model.
    min_train : int, optional
        Regions with fewer training spectra are not used (default: twice the coefficients per pixel).
    seed : int
        Seed of the k-means initialisation.
    continuum_terms : int
        Fit a smooth multiplicative continuum correction (this many cubic B-splines) with the labels of
        every spectrum (0: off); see :class:`~specabund.baselines.cannon.CannonModel`.
    prior : bool
        Infer labels as the maximum of the posterior with a Gaussian prior: the mean and covariance of the
        whole training label set (the same prior for every region). Off: maximum likelihood.
    """

    kind = "regional"

    def __init__(
        self,
        label_names: list[str],
        label_mean: np.ndarray | None = None,
        label_scale: np.ndarray | None = None,
        *,
        n_regions: int = 8,
        order: int = 3,
        finder_order: int = 2,
        overlap: int = 2,
        region_labels: Sequence[str] | None = None,
        scatter_grid: Sequence[float] = REGIONAL_SCATTER_GRID,
        ridge: float = 1e-8,
        bound_margin: float = 0.1,
        censor: dict[str, np.ndarray] | None = None,
        min_train: int | None = None,
        seed: int = 0,
        prior: bool = False,
        continuum_terms: int = 0,
    ) -> None:
        if n_regions < 1:
            raise SpecabundError(f"n_regions must be >= 1, got {n_regions}")
        if overlap < 1:
            raise SpecabundError(f"overlap must be >= 1, got {overlap}")
        self.label_names = list(label_names)
        if region_labels is None:
            region_labels = [n for n in self.label_names if censored_element(n) is None] or self.label_names
        unknown = [n for n in region_labels if n not in self.label_names]
        if unknown:
            raise DataMismatchError(f"region labels {unknown} not among the labels {self.label_names}")
        self.region_labels = list(region_labels)
        self._rcols = np.array([self.label_names.index(n) for n in self.region_labels])
        self.n_regions = int(n_regions)
        self.order = int(order)
        self.finder_order = int(finder_order)
        self.overlap = int(overlap)
        self.scatter_grid = tuple(float(s) for s in scatter_grid)
        self.ridge = float(ridge)
        self.bound_margin = float(bound_margin)
        self.censor = {k: np.asarray(v, dtype=bool).copy() for k, v in (censor or {}).items()}
        self.seed = int(seed)
        self.prior = bool(prior)
        self.continuum_terms = int(continuum_terms)
        self.label_mean = None if label_mean is None else np.asarray(label_mean, dtype=np.float64)
        self.label_scale = None if label_scale is None else np.asarray(label_scale, dtype=np.float64)
        self.centroids: np.ndarray | None = None
        self.usable: np.ndarray | None = None
        self.finder: CannonModel | None = None
        self.regions: list[CannonModel] = []
        probe = self._new(self.order)  # validates order, censoring and labels once
        self.min_train = int(min_train) if min_train is not None else 2 * probe.n_terms

    def _new(self, order: int) -> CannonModel:
        return CannonModel(
            self.label_names,
            self.label_mean,
            self.label_scale,
            scatter_grid=self.scatter_grid,
            ridge=self.ridge,
            bound_margin=self.bound_margin,
            censor=self.censor,
            order=order,
            prior=self.prior,
            continuum_terms=self.continuum_terms,
        )

    # ------------------------------------------------------------------ regions
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pixels(self) -> int | None:
        return None if self.finder is None else self.finder.n_pixels

    @property
    def n_train(self) -> int:
        return 0 if self.finder is None else self.finder.n_train

    def _z(self, labels: np.ndarray) -> np.ndarray:
        assert self.label_mean is not None and self.label_scale is not None
        lab = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        return ((lab - self.label_mean) / self.label_scale)[:, self._rcols]

    def set_regions(self, labels: np.ndarray) -> RegionalCannon:
        """Fix the standardisation (when unset) and the k-means regions from the training labels (N, L).

        Call it with the whole training set before batch training so that batches equal one fit.
        """
        from scipy.cluster.vq import kmeans2

        lab = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        if lab.shape[1] != self.n_labels:
            raise DataMismatchError(f"labels have {lab.shape[1]} columns, the model {self.n_labels}")
        lab = lab[np.all(np.isfinite(lab), axis=1)]
        if len(lab) == 0:
            raise SpecabundError("no training spectra with finite labels to place the regions")
        if self.label_mean is None or self.label_scale is None:
            self.label_mean = lab.mean(axis=0)
            sc = lab.std(axis=0)
            self.label_scale = np.where(sc > 0, sc, 1.0)
        z = self._z(lab)
        k = min(self.n_regions, len(np.unique(z, axis=0)))
        if k <= 1:
            cent = z.mean(axis=0, keepdims=True)
        else:
            cent, _ = kmeans2(z, k, seed=np.random.default_rng(self.seed), minit="++")
        self.centroids = np.asarray(cent, dtype=np.float64)
        self.finder = self._new(self.finder_order)
        self.regions = [self._new(self.order) for _ in range(len(self.centroids))]
        return self

    def _distances(self, labels: np.ndarray) -> np.ndarray:
        assert self.centroids is not None
        z = self._z(labels)
        return np.sum((z[:, None, :] - self.centroids[None]) ** 2, axis=2)

    def membership(self, labels: np.ndarray) -> np.ndarray:
        """Bool (N, K): the ``overlap`` nearest regions of each (physical) label vector."""
        d = self._distances(labels)
        m = min(self.overlap, d.shape[1])
        near = np.argsort(d, axis=1, kind="stable")[:, :m]
        out = np.zeros(d.shape, dtype=bool)
        np.put_along_axis(out, near, True, axis=1)
        return out

    def assign(self, labels: np.ndarray) -> np.ndarray:
        """Index of the nearest usable region for each (physical) label vector, shape (N,)."""
        if self.usable is None:
            raise SpecabundError("regional Cannon is not trained (call fit or solve)")
        d = np.where(self.usable[None, :], self._distances(labels), np.inf)
        return np.argmin(d, axis=1)

    # ------------------------------------------------------------------ training
    def partial_fit(self, X: np.ndarray, ivar: np.ndarray, labels: np.ndarray) -> RegionalCannon:
        """Accumulate spectra in the finder and in the models of their regions (call :meth:`solve` after)."""
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        if self.centroids is None:
            self.set_regions(labels)
        assert self.finder is not None
        self.finder.partial_fit(X, ivar, labels)
        ok = np.all(np.isfinite(labels), axis=1)
        member = np.zeros((len(labels), len(self.regions)), dtype=bool)
        if ok.any():
            member[ok] = self.membership(labels[ok])
        X, ivar = np.asarray(X), np.asarray(ivar)
        for k, model in enumerate(self.regions):
            rows = np.flatnonzero(member[:, k])
            if rows.size:
                model.partial_fit(X[rows], ivar[rows], labels[rows])
        return self

    def solve(self) -> RegionalCannon:
        """Solve every model; regions with fewer than ``min_train`` spectra are marked unusable."""
        if self.finder is None:
            raise SpecabundError("no training spectra accumulated")
        self.finder.solve()
        usable = np.zeros(len(self.regions), dtype=bool)
        for k, model in enumerate(self.regions):
            if model.n_train >= self.min_train:
                model.solve()
                # one prior for all: the labels of the whole training set, not of the region
                model.prior_mean, model.prior_precision = self.finder.prior_mean, self.finder.prior_precision
                usable[k] = True
        if not usable.any():
            raise SpecabundError(
                f"no region has the {self.min_train} training spectra its model needs "
                f"(regions hold {[m.n_train for m in self.regions]}); use fewer regions or a lower order"
            )
        if not usable.all():
            logger.warning(
                "regional Cannon: %d of %d regions have fewer than %d training spectra and are not used",
                int((~usable).sum()),
                len(usable),
                self.min_train,
            )
        self.usable = usable
        return self

    def fit(self, X: np.ndarray, ivar: np.ndarray, labels: np.ndarray) -> RegionalCannon:
        """Place the regions and train every model from scratch."""
        self.set_regions(labels)
        return self.partial_fit(X, ivar, labels).solve()

    # ------------------------------------------------------------------ inference
    def predict(self, X: np.ndarray, ivar: np.ndarray) -> np.ndarray:
        """Infer all labels (N, L): region from the finder, labels from that region's model (see module)."""
        if self.finder is None or self.usable is None:
            raise SpecabundError("regional Cannon is not trained (call fit or solve)")
        X, ivar = np.atleast_2d(X), np.atleast_2d(ivar)
        # all models share the standardisation and the continuum basis, so the finder's parameters
        # start the regional fit (one start instead of two), and those start the reassigned fit
        q, _ = self.finder.fit_parameters(X, ivar)  # rows without usable pixels stay NaN throughout
        labels = self.finder.unstandardise(q[:, : self.n_labels])
        ok = np.all(np.isfinite(labels), axis=1)
        region = np.full(len(X), -1)
        for _ in range(2):  # the region of the finder's labels, then of the regional labels
            best = np.full(len(X), -1)
            best[ok] = self.assign(labels[ok])
            for k in np.unique(best[ok & (best != region)]):
                rows = np.flatnonzero(ok & (best == k) & (region != k))
                q[rows], _ = self.regions[k].fit_parameters(X[rows], ivar[rows], start=q[rows])
            region = best
            labels = self.finder.unstandardise(q[:, : self.n_labels])
        return labels

    def predict_label(self, X: np.ndarray, ivar: np.ndarray, name: str) -> np.ndarray:
        """Infer all labels and return the column ``name``, shape (N,)."""
        if name not in self.label_names:
            raise DataMismatchError(f"label {name!r} not among the Cannon labels {self.label_names}")
        return self.predict(X, ivar)[:, self.label_names.index(name)]

    def model_flux(self, labels: np.ndarray) -> np.ndarray:
        """Model spectra for physical labels (N, L), each from the model of its nearest usable region."""
        lab = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        region = self.assign(lab)
        assert self.finder is not None and self.finder.n_pixels is not None
        out = np.empty((len(lab), self.finder.n_pixels))
        for k in np.unique(region):
            rows = region == k
            out[rows] = self.regions[k].model_flux(lab[rows])
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, include_accumulators: bool = False) -> None:
        """Write every model to one npz atomically (with the normal equations when asked, for resuming)."""
        if self.finder is None or self.usable is None or self.centroids is None:
            raise SpecabundError("regional Cannon is not trained")
        assert self.label_mean is not None and self.label_scale is not None
        arrays: dict[str, np.ndarray] = {
            "kind": np.asarray(self.kind),
            "label_names": np.asarray(self.label_names, dtype=str),
            "region_labels": np.asarray(self.region_labels, dtype=str),
            "label_mean": self.label_mean,
            "label_scale": self.label_scale,
            "settings": np.asarray(
                [
                    self.n_regions,
                    self.order,
                    self.finder_order,
                    self.overlap,
                    self.min_train,
                    self.seed,
                    self.prior,
                    self.continuum_terms,
                ]
            ),
            "scatter_grid": np.asarray(self.scatter_grid),
            "ridge": np.asarray(self.ridge),
            "bound_margin": np.asarray(self.bound_margin),
            "censor_names": np.asarray(list(self.censor), dtype=str),
            "censor_masks": (
                np.stack(list(self.censor.values())) if self.censor else np.zeros((0, 0), dtype=bool)
            ),
            "centroids": self.centroids,
            "usable": self.usable,
        }
        parts = {"finder": self.finder, **{f"r{k}": m for k, m in enumerate(self.regions)}}
        for prefix, model in parts.items():
            if model.theta is None:  # an unusable region: keep its sums for resuming, nothing else
                if include_accumulators and model._acc is not None:
                    arrays.update({f"{prefix}__acc_{k}": v for k, v in model._acc.items()})
                    arrays.update(_partial_state(model, prefix))
                continue
            arrays.update({f"{prefix}__{k}": v for k, v in model.to_arrays(include_accumulators).items()})
        atomic_savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RegionalCannon:
        """Read a model written by :meth:`save` (``allow_pickle=False``)."""
        d = read_npz(path)
        if str(d.get("kind", "")) != cls.kind:
            raise SpecabundError(f"{path}: not a regional Cannon file")
        return cls.from_arrays(d)

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> RegionalCannon:
        n_regions, order, finder_order, overlap, min_train, seed, prior, cont = (
            int(v) for v in d["settings"]
        )
        model = cls(
            [str(s) for s in d["label_names"].tolist()],
            d["label_mean"],
            d["label_scale"],
            n_regions=n_regions,
            order=order,
            finder_order=finder_order,
            overlap=overlap,
            region_labels=[str(s) for s in d["region_labels"].tolist()],
            scatter_grid=d["scatter_grid"].tolist(),
            ridge=float(d["ridge"]),
            bound_margin=float(d["bound_margin"]),
            censor=dict(zip([str(s) for s in d["censor_names"].tolist()], d["censor_masks"], strict=True)),
            min_train=min_train,
            seed=seed,
            prior=bool(prior),
            continuum_terms=cont,
        )
        model.centroids = d["centroids"]
        model.usable = d["usable"].astype(bool)

        def part(prefix: str, order_: int) -> CannonModel:
            sub = {k[len(prefix) + 2 :]: v for k, v in d.items() if k.startswith(prefix + "__")}
            if "theta" in sub:
                return CannonModel.from_arrays(sub)
            m = model._new(order_)
            m._acc = accumulators_from_arrays(m, sub)
            if m._acc is not None:
                m.n_pixels = int(sub["acc_b"].shape[1])
                m.n_train = int(sub["n_train"])
                m.label_min, m.label_max = sub["label_min"], sub["label_max"]
            return m

        model.finder = part("finder", finder_order)
        model.regions = [part(f"r{k}", order) for k in range(len(model.centroids))]
        return model


def _partial_state(model: CannonModel, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}__n_train": np.asarray(model.n_train),
        f"{prefix}__label_min": model.label_min if model.label_min is not None else np.zeros(0),
        f"{prefix}__label_max": model.label_max if model.label_max is not None else np.zeros(0),
    }


def load_cannon(path: str | Path) -> CannonModel | RegionalCannon:
    """Read a single or regional Cannon ``.npz``, whichever the file holds."""
    d = read_npz(path)
    kind = str(d["kind"]) if "kind" in d else "cannon"
    if kind == RegionalCannon.kind:
        return RegionalCannon.from_arrays(d)
    if kind == "cannon":
        return CannonModel.from_arrays(d)
    raise SpecabundError(f"{path}: unknown Cannon kind {kind!r}")
