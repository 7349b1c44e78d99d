"""Train and evaluate the baselines over batches of the training split, resumably.

For one element and model, :func:`run_baseline` works in
``<out_root>/baseline_<element>_<model>_batch_results/``:

* the eligible training spectra (training split, finite label; for the Cannon all its labels finite) are
  shuffled with ``seed`` and cut into batches of ``batch_size`` (one batch when ``batch_size`` is None);
* batch ``k`` continues the model with that batch (XGBoost/LightGBM: up to
  ``BoostingConfig.rounds_per_batch`` more boosting rounds with early stopping on the validation split,
  or ``n_rounds`` when there is a single batch; Cannon: the batch is added to the normal equations, which
  makes the batched Cannon identical to a single fit. By default the Cannon is regional (cubic models per
  k-means region of Teff/logg/[Fe/H], see :mod:`~specabund.baselines.regional`; the regions come from the
  whole training split before the first batch) and its ``X_FE`` label is censored to pixels near its
  element's lines and bands, see :func:`~specabund.baselines.cannon.censoring_masks` and
  :class:`CannonSettings`);
* after each batch the model is evaluated on the validation and test splits and
  ``batch_<k>/metrics.json``, ``batch_<k>/one_to_one.png``, ``batch_<k>/residual_hist.png`` and
  ``batch_<k>/test_predictions.npz`` are written, the model is saved atomically to
  ``models/batch_<k>*``, and a row is added to ``batch_tracking.csv``
  (:class:`~specabund.tracking.BatchTracker`);
* every ``batches_per_round`` processed batches, and at the end of each call, the trend plot and summary
  (``BatchTracker.finalize``) and the comparison table ``<out_root>/baseline/comparison.csv`` (test
  metrics of the latest model, overall and per SNR bin) with its figure are refreshed.

A batch counts as done once its tracking row exists. An interrupted run (or one limited by
``max_batches``) resumes at the next batch from the saved model of the last done batch; batch ``k`` always
uses the same spectra and seed, so a resumed run reproduces an uninterrupted one. Changing the data, batch
size, seed or configuration of an existing run raises :class:`~specabund.errors.DataMismatchError`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..dataset import SPLIT_CODES, Dataset
from ..errors import ConfigError, DataMismatchError, SpecabundError
from ..metrics import DEFAULT_SNR_BINS, metrics_by_snr, regression_metrics
from ..plotting import save_figure
from ..tracking import BatchTracker
from ..utils import atomic_savez, atomic_write_json, hash_bytes, hash_json
from .boosting import BOOSTING_KINDS, BoostingConfig, BoostingRegressor
from .cannon import DEFAULT_CENSOR_HALF_WIDTH, DEFAULT_SCATTER_GRID, CannonModel, censoring_masks
from .comparison import comparison_rows, save_comparison_figure, update_comparison
from .features import PCAReducer
from .plots import one_to_one_figure, residual_histogram_figure
from .regional import REGIONAL_SCATTER_GRID, RegionalCannon, auto_n_regions, load_cannon

logger = logging.getLogger(__name__)

BASE_MODELS: tuple[str, ...] = ("xgboost", "lightgbm", "cannon", "labels_only")
#: The labels-only baseline: LightGBM of the label on the catalogue's Teff, logg and [Fe/H], no spectrum.
LABELS_ONLY = "labels_only"
MODEL_CHOICES: tuple[str, ...] = (*BASE_MODELS, "both", "all")
STELLAR_LABELS: dict[str, str] = {"TEFF": "teff", "LOGG": "logg", "FE_H": "fe_h"}
TREND_METRICS: tuple[str, ...] = (
    "val_rmse",
    "test_rmse",
    "test_robust_scatter",
    "test_bias",
    "test_r2",
    "fit_seconds",
)

BaselineModel = BoostingRegressor | CannonModel | RegionalCannon
CANNON_TYPES = (CannonModel, RegionalCannon)


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


def resolve_models(model_name: str) -> list[str]:
    """Concrete model names for ``'xgboost'``, ``'lightgbm'``, ``'cannon'``, ``'labels_only'``, ``'both'``
    (the two tree models) or ``'all'``."""
    name = model_name.lower()
    if name == "both":
        return ["xgboost", "lightgbm"]
    if name == "all":
        return list(BASE_MODELS)
    if name in BASE_MODELS:
        return [name]
    raise ConfigError(f"model must be one of {MODEL_CHOICES}, got {model_name!r}")


def batch_results_dir(out_root: str | Path, element: str, model: str) -> Path:
    """``<out_root>/baseline_<element>_<model>_batch_results``."""
    from ..workspace import batch_results_dir as _batch_results_dir

    return _batch_results_dir(out_root, "baseline", f"{element}_{model}")


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


class _Run:
    """State of one (element, model) batch run; see :func:`run_baseline`."""

    def __init__(
        self,
        dataset: Dataset,
        element: str,
        model: str,
        out_root: Path,
        batch_size: int | None,
        n_threads: int | None,
        device: str,
        seed: int,
        boosting_config: BoostingConfig,
        snr_bins: tuple[float, ...],
        cannon: CannonSettings,
    ) -> None:
        self.ds = dataset
        self.element = element
        self.model = model
        self.out_root = Path(out_root)
        self.n_threads = n_threads
        self.device = device
        self.seed = int(seed)
        self.boosting_config = boosting_config
        self.snr_bins = tuple(snr_bins)
        self.cannon = cannon
        self.folder = batch_results_dir(out_root, element, model)
        self.models_dir = self.folder / "models"
        self.tracker = BatchTracker(self.folder, f"{element}_{model}")

        self.target = label_column(dataset, element)
        split = dataset.split
        self.given: np.ndarray | None = None
        if model == LABELS_ONLY:
            self.feature_names = labels_only_features(dataset, element)
            self.given = np.column_stack([label_column(dataset, n) for n in self.feature_names])
        if model == "cannon":
            self.label_names = cannon_label_names(dataset, element)
            self.labels = np.column_stack([label_column(dataset, n) for n in self.label_names])
            eligible = np.all(np.isfinite(self.labels), axis=1)
        else:
            self.label_names = [element]
            self.labels = self.target[:, None]
            eligible = np.isfinite(self.target)
        self.train_idx = np.flatnonzero((split == SPLIT_CODES["train"]) & eligible)
        self.val_idx = np.flatnonzero((split == SPLIT_CODES["val"]) & np.isfinite(self.target))
        self.test_idx = np.flatnonzero((split == SPLIT_CODES["test"]) & np.isfinite(self.target))
        if len(self.train_idx) < 2:
            raise SpecabundError(
                f"{element}/{model}: only {len(self.train_idx)} training spectra with finite labels "
                f"{self.label_names}"
            )
        perm = np.random.default_rng(self.seed).permutation(self.train_idx)
        n_batches = 1 if not batch_size else math.ceil(len(perm) / int(batch_size))
        self.batches = np.array_split(perm, n_batches)
        self.batch_size = batch_size

    # ------------------------------------------------------------------ bookkeeping
    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def run_info(self) -> dict[str, Any]:
        cfg: dict[str, Any]
        if self.model == "cannon":
            c = self.cannon
            n_reg = c.n_regions(len(self.train_idx))
            cfg = {
                "order": c.order,
                "regions": n_reg,
                "overlap": c.overlap,
                "scatter_grid": list(c.grid(n_reg)),
                "censor_half_width": c.censor_half_width,
                "prior": c.prior,
                "continuum_terms": c.continuum_terms(self.ds.n_pixels),
            }
        else:
            cfg = asdict(self._boosting_config())
            if self.given is not None:
                cfg["inputs"] = self.feature_names
        data_hash = hash_bytes(
            self.train_idx.astype(np.int64).tobytes(),
            np.ascontiguousarray(self.labels[self.train_idx]).tobytes(),
            str(self.ds.X.shape).encode(),
            self.ds.preprocess_hash.encode(),
        )
        return {
            "model": self.model,
            "element": self.element,
            "label_names": self.label_names,
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
            "n_train": len(self.train_idx),
            "seed": self.seed,
            "config": cfg,
            "data_hash": data_hash,
        }

    def check_run_info(self) -> None:
        path = self.folder / "run.json"
        info = self.run_info()
        if path.exists() and self.tracker.completed():
            old = json.loads(path.read_text(encoding="utf-8"))
            if hash_json(old) != hash_json(info):
                diff = sorted(k for k in info if old.get(k) != json.loads(json.dumps(info[k])))
                raise DataMismatchError(
                    f"{self.folder}: an earlier run used different settings or data ({', '.join(diff)}); "
                    "delete the folder or choose another out_root to start again"
                )
        atomic_write_json(path, info)

    def model_path(self, k: int) -> Path:
        if self.model == "cannon":
            return self.models_dir / f"batch_{k}_cannon.npz"
        return self.models_dir / f"batch_{k}.json"

    # ------------------------------------------------------------------ model handling
    def _boosting_config(self) -> BoostingConfig:
        if self.model == LABELS_ONLY:
            return replace(self.boosting_config, features="given")
        return self.boosting_config

    def _inputs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's inputs for rows ``idx``: the spectra, or the catalogue labels (labels-only)."""
        if self.given is not None:
            return self.given[idx], None
        return self.ds.X[idx], self.ds.ivar[idx]

    def new_model(self) -> BaselineModel:
        if self.model == "cannon":
            return self.cannon.build(
                self.label_names, self.labels[self.train_idx], self.ds.wavelength, seed=self.seed
            )
        kind = "lightgbm" if self.model == LABELS_ONLY else self.model
        m = BoostingRegressor(kind, self._boosting_config(), self.n_threads, self.device, self.seed)
        if m.config.features == "pca":
            idx = self.train_idx
            m.set_reducer(
                PCAReducer.fit(
                    self.ds.X[idx], self.ds.ivar[idx], self.boosting_config.n_components, self.seed
                )
            )
        return m

    def load_model(self, k: int) -> BaselineModel:
        if self.model == "cannon":
            return load_cannon(self.model_path(k))
        return BoostingRegressor.load(self.models_dir, f"batch_{k}", self.n_threads, self.device)

    def save_model(self, model: BaselineModel, k: int) -> None:
        if isinstance(model, CANNON_TYPES):
            model.save(self.model_path(k), include_accumulators=True)
        else:
            model.save(self.models_dir, f"batch_{k}")

    def drop_old_models(self, keep: int) -> None:
        if not self.models_dir.exists():
            return
        for p in self.models_dir.iterdir():
            name = p.name
            if not name.startswith("batch_"):
                continue
            num = name[len("batch_") :].split("_")[0].split(".")[0]
            if num.isdigit() and int(num) < keep:
                p.unlink(missing_ok=True)

    def fit_batch(self, model: BaselineModel, k: int) -> None:
        idx = self.batches[k - 1]
        X, iv = self._inputs(idx)
        if isinstance(model, CANNON_TYPES):
            model.partial_fit(X, iv, self.labels[idx]).solve()
            return
        c = self.boosting_config
        rounds = c.n_rounds if self.n_batches == 1 else c.rounds_per_batch
        Xv, ivv = self._inputs(self.val_idx)
        model.fit(X, iv, self.target[idx], Xv, ivv, self.target[self.val_idx], n_rounds=rounds)

    def predict(self, model: BaselineModel, idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros(0)
        X, iv = self._inputs(idx)
        if isinstance(model, CANNON_TYPES):
            return model.predict_label(X, iv, self.element)
        return model.predict(X, iv)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: BaselineModel, k: int, fit_seconds: float, n_seen: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        pv = self.predict(model, self.val_idx)
        pt = self.predict(model, self.test_idx)
        dt = time.perf_counter() - t0
        n_pred = len(self.val_idx) + len(self.test_idx)
        yv, yt = self.target[self.val_idx], self.target[self.test_idx]
        val = regression_metrics(yv, pv)
        test = metrics_by_snr(yt, pt, self.ds.snr[self.test_idx], self.snr_bins)
        bdir = self.folder / f"batch_{k}"
        title = f"{self.element} {self.model} batch {k}/{self.n_batches}"
        save_figure(
            one_to_one_figure(yt, pt, self.ds.snr[self.test_idx], self.element, f"{title} (test)"),
            bdir / "one_to_one.png",
        )
        save_figure(
            residual_histogram_figure({"val": pv - yv, "test": pt - yt}, self.element, title),
            bdir / "residual_hist.png",
        )
        atomic_savez(
            bdir / "test_predictions.npz",
            index=self.test_idx,
            spec=np.asarray(self.ds.spec[self.test_idx], dtype=str),
            snr=np.asarray(self.ds.snr[self.test_idx], dtype=np.float32),
            y_true=yt,
            y_pred=pt,
        )
        row: dict[str, Any] = {
            "n_train_batch": len(self.batches[k - 1]),
            "n_train_seen": n_seen,
            "fit_seconds": fit_seconds,
            "predict_per_second": n_pred / dt if dt > 0 else float("nan"),
        }
        if isinstance(model, BoostingRegressor):
            row["n_trees"] = model.n_trees
        row.update({f"val_{m}": val[m] for m in ("n", "rmse", "robust_scatter", "bias", "r2")})
        row.update({f"test_{m}": test["all"][m] for m in ("n", "rmse", "robust_scatter", "bias", "r2")})
        atomic_write_json(
            bdir / "metrics.json",
            {
                "model": self.model,
                "element": self.element,
                "batch": k,
                "n_batches": self.n_batches,
                "labels": self.label_names,
                **row,
                "val": val,
                "test": test,
            },
        )
        return row

    def last_test_metrics(self) -> dict[str, Any] | None:
        done = self.tracker.completed()
        if not done:
            return None
        path = self.folder / f"batch_{max(done)}" / "metrics.json"
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def refresh(self) -> dict[str, Any] | None:
        """Trend plot, summary and comparison rows from the latest done batch."""
        self.tracker.finalize([m for m in TREND_METRICS if m in self.tracker.table().columns])
        last = self.last_test_metrics()
        if last is not None:
            table = update_comparison(self.out_root, comparison_rows(self.model, self.element, last["test"]))
            save_comparison_figure(self.out_root, table)
        return last

    # ------------------------------------------------------------------ main loop
    def run(self, batches_per_round: int, max_batches: int | None) -> dict[str, Any]:
        self.check_run_info()
        done = self.tracker.completed()
        if done != list(range(1, len(done) + 1)):
            raise DataMismatchError(
                f"{self.tracker.csv_path}: batches {done} are not 1..n; delete the folder"
            )
        if len(done) > self.n_batches:
            raise DataMismatchError(
                f"{self.folder}: {len(done)} batches recorded but the run has {self.n_batches}"
            )
        k = len(done) + 1
        model = self.load_model(k - 1) if k > 1 else None
        n_seen = sum(len(b) for b in self.batches[: k - 1])
        processed = 0
        while k <= self.n_batches and (max_batches is None or processed < max_batches):
            if model is None:
                model = self.new_model()
            t0 = time.perf_counter()
            self.fit_batch(model, k)
            fit_s = time.perf_counter() - t0
            n_seen += len(self.batches[k - 1])
            row = self.evaluate(model, k, fit_s, n_seen)
            self.save_model(model, k)
            self.tracker.record(k, row)
            self.drop_old_models(keep=k)
            logger.info(
                "%s/%s batch %d/%d: val RMSE %.4g test RMSE %.4g",
                self.element,
                self.model,
                k,
                self.n_batches,
                row["val_rmse"],
                row["test_rmse"],
            )
            processed += 1
            k += 1
            if processed % batches_per_round == 0 and k <= self.n_batches:
                self.refresh()
        last = self.refresh() if self.tracker.completed() else None
        done_now = len(self.tracker.completed())
        return {
            "model": self.model,
            "element": self.element,
            "labels": self.label_names,
            "folder": self.folder,
            "n_batches": self.n_batches,
            "batches_done": done_now,
            "processed_now": processed,
            "complete": done_now == self.n_batches,
            "model_path": self.model_path(done_now) if done_now else None,
            "val": last["val"] if last else None,
            "test": last["test"] if last else None,
        }


def run_baseline(
    dataset: Dataset,
    element: str,
    model_name: str,
    out_root: str | Path,
    batch_size: int | None = None,
    batches_per_round: int = 5,
    n_threads: int | None = None,
    device: str = "cpu",
    seed: int = 42,
    *,
    max_batches: int | None = None,
    boosting_config: BoostingConfig | None = None,
    snr_bins: tuple[float, ...] = DEFAULT_SNR_BINS,
    cannon: CannonSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Train, evaluate and compare baseline model(s) for one element, batch by batch and resumably.

    See the module docstring for the folder layout and the resume rules.

    Parameters
    ----------
    dataset : Dataset
        Preprocessed spectra with splits (0 train, 1 val, 2 test).
    element : str
        Label to predict (a column name such as ``'C_FE'``, or ``'TEFF'``/``'LOGG'``/``'FE_H'``).
    model_name : str
        ``'xgboost'``, ``'lightgbm'``, ``'cannon'``, ``'both'`` (XGBoost and LightGBM) or ``'all'``.
    out_root : Path
        Results root.
    batch_size : int, optional
        Training spectra per batch; ``None`` trains on the whole training split as one batch.
    batches_per_round : int
        Batches processed between refreshes of the trend plot, summary and comparison table (they are
        always refreshed at the end of the call). Each batch still gets its own metrics and plots.
    n_threads : int, optional
        CPU threads for the tree models (``None``: ``os.cpu_count()``).
    device : str
        ``'cpu'`` or ``'cuda'``/``'gpu'`` for the tree models (the Cannon runs on the CPU).
    seed : int
        Seed of the batch shuffling, PCA and boosting.
    max_batches : int, optional
        Process at most this many batches in this call (the rest is done by a later call).
    boosting_config : BoostingConfig, optional
        Tree-model hyper-parameters.
    snr_bins : tuple of float
        SNR bin edges of the test metrics.
    cannon : CannonSettings, optional
        Order, regions, overlap, censoring and scatter grid of the Cannon (default
        :class:`CannonSettings()`: cubic models in one region per 400 training spectra, at most 8, with the
        ``X_FE`` label censored to within 4 Angstrom of its element's lines). Censoring (Casey et al. 2016)
        fits the abundance's coefficients only near its element's lines in the line list (molecular bands
        over their extent) and needs ``dataset.wavelength`` in vacuum Angstrom; TEFF, LOGG and FE_H stay
        free.

    Returns
    -------
    dict
        ``{model: result}`` per concrete model; a result holds ``folder``, ``n_batches``,
        ``batches_done``, ``processed_now``, ``complete``, ``model_path``, ``labels``, ``val`` (metrics
        of the validation split) and ``test`` (metrics per SNR bin, key ``'all'`` for the whole split),
        all of the latest done batch.
    """
    if batch_size is not None and int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if batches_per_round < 1:
        raise ConfigError(f"batches_per_round must be >= 1, got {batches_per_round}")
    if max_batches is not None and max_batches < 0:
        raise ConfigError(f"max_batches must be >= 0, got {max_batches}")
    cfg = boosting_config or BoostingConfig()
    out: dict[str, dict[str, Any]] = {}
    for model in resolve_models(model_name):
        run = _Run(
            dataset,
            element,
            model,
            Path(out_root),
            batch_size,
            n_threads,
            device,
            seed,
            cfg,
            tuple(snr_bins),
            cannon or CannonSettings(),
        )
        out[model] = run.run(batches_per_round, max_batches)
    return out


def show_batch_results(out_root: str | Path, element: str, model_name: str) -> pd.DataFrame:
    """The per-batch table(s) of a baseline run, with a leading ``model`` column (empty when none ran)."""
    frames = []
    for model in resolve_models(model_name):
        df = BatchTracker(batch_results_dir(out_root, element, model), f"{element}_{model}").table()
        if len(df):
            frames.append(df.assign(model=model)[["model", *df.columns]])
    if not frames:
        return pd.DataFrame({"model": pd.Series(dtype=str), "batch": pd.Series(dtype=int)})
    return pd.concat(frames, ignore_index=True)


def load_baseline(
    out_root: str | Path, element: str, model: str, n_threads: int | None = None, device: str = "cpu"
) -> BaselineModel:
    """The model of the latest done batch of a run (no pickle involved)."""
    if model not in BASE_MODELS:
        raise ConfigError(f"model must be one of {BASE_MODELS}, got {model!r}")
    folder = batch_results_dir(out_root, element, model)
    done = BatchTracker(folder, f"{element}_{model}").completed()
    if not done:
        raise SpecabundError(f"{folder}: no finished batch, run the baseline first")
    k = max(done)
    if model == "cannon":
        return load_cannon(folder / "models" / f"batch_{k}_cannon.npz")
    return BoostingRegressor.load(folder / "models", f"batch_{k}", n_threads, device)


def predict_baseline(model: BaselineModel, X: np.ndarray, ivar: np.ndarray, element: str) -> np.ndarray:
    """Predict ``element`` for spectra ``X`` with a tree model or a Cannon, shape (N,)."""
    if isinstance(model, CANNON_TYPES):
        return model.predict_label(X, ivar, element)
    if model.kind not in BOOSTING_KINDS:
        raise ConfigError(f"unknown model kind {model.kind!r}")
    return model.predict(X, ivar)
