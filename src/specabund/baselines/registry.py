"""The baselines the batch runner knows, each behind one small protocol, registered by name.

A baseline model as the runner sees it (:class:`Baseline`) offers ``fit`` (one more training batch),
``predict`` (the target label), ``save`` and ``load``; a :class:`BaselineKind` in :data:`BASELINES` says
which labels a model fits, what its inputs are, how to make a new one and where its files go. To add a
baseline, write the two classes and add the kind to :data:`BASELINES` (see ARCHITECTURE.md).

* ``xgboost``, ``lightgbm`` - gradient-boosted trees on PCA-reduced (default) or raw spectra
  (:class:`TreeBaseline`);
* ``labels_only`` - LightGBM on the catalogue's Teff, logg and [Fe/H], no spectrum: how much of a label
  its correlations with the stellar parameters give away;
* ``cannon`` - the (regional) Cannon, all of TEFF, LOGG, FE_H and the element fitted jointly
  (:class:`CannonBaseline`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..dataset import SPLIT_CODES, Dataset
from ..errors import ConfigError, DataMismatchError, SpecabundError
from .boosting import BoostingConfig, BoostingRegressor
from .cannon import DEFAULT_CENSOR_HALF_WIDTH, DEFAULT_SCATTER_GRID, CannonModel, censoring_masks
from .features import PCAReducer
from .regional import REGIONAL_SCATTER_GRID, RegionalCannon, auto_n_regions, load_cannon

#: Catalogue columns of the stellar labels, by label name.
STELLAR_LABELS: dict[str, str] = {"TEFF": "teff", "LOGG": "logg", "FE_H": "fe_h"}


def label_column(dataset: Dataset, name: str) -> np.ndarray:
    """Values of label ``name`` (a column of ``y``, or TEFF/LOGG/FE_H from the catalogue columns), float64."""
    if name in dataset.elements:
        return dataset.y[:, dataset.label_index(name)].astype(np.float64)
    if name in STELLAR_LABELS:
        return np.asarray(getattr(dataset, STELLAR_LABELS[name]), dtype=np.float64)
    raise DataMismatchError(
        f"label {name!r} not in dataset labels {dataset.elements} nor {list(STELLAR_LABELS)}"
    )


def labels_only_features(dataset: Dataset, element: str) -> list[str]:
    """Inputs of the labels-only baseline for ``element``: the catalogue's TEFF, LOGG and FE_H (those with
    values in the training split), the element itself excluded."""
    train = dataset.split == SPLIT_CODES["train"]
    names = [n for n in STELLAR_LABELS if n != element and np.isfinite(label_column(dataset, n)[train]).any()]
    if not names:
        raise SpecabundError(
            f"labels_only baseline for {element}: the data carry no Teff, logg or [Fe/H] to predict it from"
        )
    return names


def cannon_label_names(dataset: Dataset, element: str, min_fraction: float = 0.5) -> list[str]:
    """Labels the Cannon fits jointly for ``element``: TEFF, LOGG, FE_H (each when finite for at least
    ``min_fraction`` of the training spectra that have ``element``) followed by ``element``."""
    target = label_column(dataset, element)
    train = (dataset.split == SPLIT_CODES["train"]) & np.isfinite(target)
    names: list[str] = []
    for name in STELLAR_LABELS:
        if name == element:
            continue
        v = label_column(dataset, name)[train]
        if v.size and np.mean(np.isfinite(v)) >= min_fraction and np.nanstd(v) > 0:
            names.append(name)
    return [*names, element]


@dataclass(frozen=True)
class CannonSettings:
    """Settings of the Cannon baseline (``[baseline] cannon_*`` in the configuration).

    Attributes
    ----------
    order : int
        Polynomial order of the (regional) models, 1-4. 3 by default: on simulated LAMOST spectra a cubic
        model per region roughly halves the [Mg/Fe] error of the classic global quadratic Cannon.
    regions : int
        Regions of the stellar-parameter space with their own model (see
        :mod:`specabund.baselines.regional`); 0 picks one per 400 training spectra (at most 8); 1 is a
        single global model (the classic Cannon with ``order=2``).
    overlap : int
        Each training spectrum trains the models of this many nearest regions.
    censor_half_width : float or None
        Censoring of the ``X_FE`` label to its element's lines (Angstrom); None turns it off.
    scatter_grid : tuple of float, optional
        Intrinsic-scatter grid (default: the single model's grid, or a coarser one for regional models).
    prior : bool
        Infer labels as the maximum of the posterior under a Gaussian prior with the mean and covariance
        of the training labels (on by default: like the trees and the CNN, the estimate then leans on
        what the training set makes likely, which matters at low SNR); off: maximum likelihood, the
        classic Cannon.
    continuum_pixels : int
        Each spectrum's labels are fitted together with a smooth multiplicative continuum correction:
        cubic B-splines with a knot every this many pixels (0 = off). Pipeline-normalised spectra keep
        star-to-star continuum errors of a few per cent on scales of a hundred pixels, which a
        per-pixel model would otherwise read as labels; on the training benchmark's data this halves
        the Cannon's Teff error at SNR > 50.
    """

    order: int = 3
    regions: int = 0
    overlap: int = 2
    censor_half_width: float | None = DEFAULT_CENSOR_HALF_WIDTH
    scatter_grid: tuple[float, ...] | None = None
    prior: bool = True
    continuum_pixels: int = 40

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3, 4):
            raise ConfigError(f"cannon order must be 1, 2, 3 or 4, got {self.order!r}")
        if self.regions < 0:
            raise ConfigError(f"cannon regions must be >= 0 (0 = automatic), got {self.regions!r}")
        if self.overlap < 1:
            raise ConfigError(f"cannon overlap must be >= 1, got {self.overlap!r}")
        if self.continuum_pixels < 0:
            raise ConfigError(
                f"cannon continuum_pixels must be >= 0 (0 = off), got {self.continuum_pixels!r}"
            )
        if self.censor_half_width is not None and self.censor_half_width < 0:
            raise ConfigError(f"cannon censor_half_width must be >= 0 or None: {self.censor_half_width!r}")

    def continuum_terms(self, n_pixels: int) -> int:
        """Number of continuum B-splines for spectra of ``n_pixels`` (0 when off)."""
        if not self.continuum_pixels:
            return 0
        return max(4, math.ceil(n_pixels / self.continuum_pixels) + 3)

    def n_regions(self, n_train: int) -> int:
        return self.regions or auto_n_regions(n_train)

    def build(
        self, label_names: list[str], train_labels: np.ndarray, wavelength: np.ndarray, seed: int = 0
    ) -> CannonModel | RegionalCannon:
        """The untrained Cannon these settings describe, for spectra on ``wavelength``.

        The label standardisation (and the regions of a regional Cannon) come from all the training
        labels (N, L) at once, so that training batch by batch adds up to one fit.
        """
        lab = np.asarray(train_labels, dtype=np.float64)
        mean, scale = lab.mean(axis=0), lab.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        censor = None
        if self.censor_half_width is not None:
            censor = censoring_masks(wavelength, label_names, self.censor_half_width)
        n_reg = self.n_regions(len(lab))
        terms = self.continuum_terms(len(wavelength))
        if n_reg == 1:
            return CannonModel(
                label_names,
                mean,
                scale,
                scatter_grid=self.grid(1),
                censor=censor,
                order=self.order,
                prior=self.prior,
                continuum_terms=terms,
            )
        return RegionalCannon(
            label_names,
            mean,
            scale,
            n_regions=n_reg,
            order=self.order,
            overlap=self.overlap,
            scatter_grid=self.grid(n_reg),
            censor=censor,
            seed=seed,
            prior=self.prior,
            continuum_terms=terms,
        ).set_regions(lab)

    def grid(self, n_regions: int) -> tuple[float, ...]:
        if self.scatter_grid is not None:
            return tuple(float(s) for s in self.scatter_grid)
        return DEFAULT_SCATTER_GRID if n_regions == 1 else REGIONAL_SCATTER_GRID


@dataclass(frozen=True)
class RunContext:
    """What a baseline gets from the batch run that trains it.

    Attributes
    ----------
    dataset : Dataset
        The preprocessed spectra with their splits.
    element : str
        The target label.
    train_idx : ndarray of int
        Rows of the eligible training spectra (all batches).
    labels : ndarray, shape (N, L)
        The labels the model fits (:meth:`BaselineKind.label_names`), every row of the dataset.
    n_batches : int
        Batches the training split is cut into.
    seed : int
        Seed of the PCA, the boosting and the Cannon's regions.
    n_threads : int or None
        CPU threads of the tree models.
    device : str
        Device of the tree models.
    boosting : BoostingConfig
        Tree-model hyper-parameters.
    cannon : CannonSettings
        Cannon settings.
    input_names : list of str or None
        Catalogue labels used as inputs instead of the spectra (the labels-only baseline).
    """

    dataset: Dataset
    element: str
    train_idx: np.ndarray
    labels: np.ndarray
    n_batches: int
    seed: int
    n_threads: int | None
    device: str
    boosting: BoostingConfig
    cannon: CannonSettings
    input_names: list[str] | None = None


#: ``(X, ivar, target)`` of the validation split (``ivar`` None for catalogue inputs).
Validation = tuple[np.ndarray, np.ndarray | None, np.ndarray]


class Baseline(Protocol):
    """A baseline model as the batch runner uses it."""

    #: The model object itself (a :class:`BoostingRegressor`, :class:`CannonModel`, ...).
    model: Any

    def fit(self, X: np.ndarray, ivar: np.ndarray | None, labels: np.ndarray, validation: Validation) -> None:
        """Continue training with one batch: inputs ``X``/``ivar``, ``labels`` (N, L) of the kind's
        label names (the target last) and ``(X, ivar, target)`` of the validation split."""

    def predict(self, X: np.ndarray, ivar: np.ndarray | None) -> np.ndarray:
        """The target label of each row, shape (N,)."""

    def save(self, folder: Path, name: str) -> None:
        """Write the model's files to ``folder``, their names starting with ``name``; no pickle."""

    def batch_info(self) -> dict[str, Any]:
        """Extra columns of the batch tracking row (e.g. the number of trees)."""


class BaselineKind(Protocol):
    """A kind of baseline in the registry: what it fits, on what, and how to make and load one."""

    name: str

    def label_names(self, dataset: Dataset, element: str) -> list[str]:
        """Labels the model fits for ``element``, the target last."""

    def input_names(self, dataset: Dataset, element: str) -> list[str] | None:
        """Catalogue labels the model reads instead of the spectra (None: the spectra)."""

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        """The settings recorded in ``run.json`` (a resumed run must match them)."""

    def new(self, ctx: RunContext) -> Baseline:
        """An untrained model for the run."""

    def load(
        self, folder: Path, name: str, element: str, n_threads: int | None, device: str, n_batches: int = 1
    ) -> Baseline:
        """The model saved by :meth:`Baseline.save` under ``folder``/``name``."""

    def model_file(self, folder: Path, name: str) -> Path:
        """The main file :meth:`Baseline.save` writes."""


# ---------------------------------------------------------------------------------------------- the trees


class TreeBaseline:
    """A :class:`BoostingRegressor` of the target; each batch adds up to ``n_rounds`` boosting rounds."""

    def __init__(self, model: BoostingRegressor, n_rounds: int) -> None:
        self.model = model
        self.n_rounds = int(n_rounds)

    def fit(self, X: np.ndarray, ivar: np.ndarray | None, labels: np.ndarray, validation: Validation) -> None:
        Xv, ivv, yv = validation
        self.model.fit(X, ivar, labels[:, -1], Xv, ivv, yv, n_rounds=self.n_rounds)

    def predict(self, X: np.ndarray, ivar: np.ndarray | None) -> np.ndarray:
        return self.model.predict(X, ivar)

    def save(self, folder: Path, name: str) -> None:
        self.model.save(folder, name)

    def batch_info(self) -> dict[str, Any]:
        return {"n_trees": self.model.n_trees}


@dataclass(frozen=True)
class TreeKind:
    """XGBoost or LightGBM of one label, on the spectra or (``labels_only``) on catalogue labels."""

    name: str
    booster: str
    catalogue_inputs: bool = False

    def label_names(self, dataset: Dataset, element: str) -> list[str]:
        return [element]

    def input_names(self, dataset: Dataset, element: str) -> list[str] | None:
        return labels_only_features(dataset, element) if self.catalogue_inputs else None

    def config(self, ctx: RunContext) -> BoostingConfig:
        return replace(ctx.boosting, features="given") if self.catalogue_inputs else ctx.boosting

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        cfg = asdict(self.config(ctx))
        if ctx.input_names is not None:
            cfg["inputs"] = ctx.input_names
        return cfg

    @staticmethod
    def _rounds(boosting: BoostingConfig, n_batches: int) -> int:
        return boosting.n_rounds if n_batches == 1 else boosting.rounds_per_batch

    def new(self, ctx: RunContext) -> TreeBaseline:
        m = BoostingRegressor(self.booster, self.config(ctx), ctx.n_threads, ctx.device, ctx.seed)
        if m.config.features == "pca":
            idx = ctx.train_idx
            m.set_reducer(
                PCAReducer.fit(ctx.dataset.X[idx], ctx.dataset.ivar[idx], ctx.boosting.n_components, ctx.seed)
            )
        return TreeBaseline(m, self._rounds(ctx.boosting, ctx.n_batches))

    def load(
        self, folder: Path, name: str, element: str, n_threads: int | None, device: str, n_batches: int = 1
    ) -> TreeBaseline:
        model = BoostingRegressor.load(folder, name, n_threads, device)
        return TreeBaseline(model, self._rounds(model.config, n_batches))

    def model_file(self, folder: Path, name: str) -> Path:
        return folder / f"{name}.json"


# --------------------------------------------------------------------------------------------- the Cannon


class CannonBaseline:
    """A (regional) Cannon: each batch is added to its normal equations, so batches add up to one fit."""

    SUFFIX: ClassVar[str] = "_cannon.npz"

    def __init__(self, model: CannonModel | RegionalCannon, element: str) -> None:
        self.model = model
        self.element = element

    def fit(self, X: np.ndarray, ivar: np.ndarray | None, labels: np.ndarray, validation: Validation) -> None:
        if ivar is None:
            raise DataMismatchError("the Cannon needs the inverse variance of the spectra")
        self.model.partial_fit(X, ivar, labels).solve()

    def predict(self, X: np.ndarray, ivar: np.ndarray | None) -> np.ndarray:
        if ivar is None:
            raise DataMismatchError("the Cannon needs the inverse variance of the spectra")
        return self.model.predict_label(X, ivar, self.element)

    def save(self, folder: Path, name: str) -> None:
        self.model.save(folder / f"{name}{self.SUFFIX}", include_accumulators=True)

    def batch_info(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class CannonKind:
    """The Cannon of TEFF, LOGG, FE_H (those with enough values) and the element, jointly."""

    name: str = "cannon"

    def label_names(self, dataset: Dataset, element: str) -> list[str]:
        return cannon_label_names(dataset, element)

    def input_names(self, dataset: Dataset, element: str) -> list[str] | None:
        return None

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        c = ctx.cannon
        n_reg = c.n_regions(len(ctx.train_idx))
        return {
            "order": c.order,
            "regions": n_reg,
            "overlap": c.overlap,
            "scatter_grid": list(c.grid(n_reg)),
            "censor_half_width": c.censor_half_width,
            "prior": c.prior,
            "continuum_terms": c.continuum_terms(ctx.dataset.n_pixels),
        }

    def new(self, ctx: RunContext) -> CannonBaseline:
        names = self.label_names(ctx.dataset, ctx.element)
        model = ctx.cannon.build(names, ctx.labels[ctx.train_idx], ctx.dataset.wavelength, seed=ctx.seed)
        return CannonBaseline(model, ctx.element)

    def load(
        self, folder: Path, name: str, element: str, n_threads: int | None, device: str, n_batches: int = 1
    ) -> CannonBaseline:
        return CannonBaseline(load_cannon(self.model_file(folder, name)), element)

    def model_file(self, folder: Path, name: str) -> Path:
        return folder / f"{name}{CannonBaseline.SUFFIX}"


#: The registry: every baseline kind by name.
BASELINES: dict[str, BaselineKind] = {
    kind.name: kind
    for kind in (
        TreeKind("xgboost", "xgboost"),
        TreeKind("lightgbm", "lightgbm"),
        CannonKind(),
        TreeKind("labels_only", "lightgbm", catalogue_inputs=True),
    )
}


def baseline_kind(name: str) -> BaselineKind:
    """The registered kind called ``name``.

    Raises
    ------
    ConfigError
        When no baseline of that name is registered.
    """
    try:
        return BASELINES[name]
    except KeyError:
        raise ConfigError(f"model must be one of {tuple(BASELINES)}, got {name!r}") from None
