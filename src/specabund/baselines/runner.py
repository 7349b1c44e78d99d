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
from .boosting import BoostingConfig
from .comparison import comparison_rows, save_comparison_figure, update_comparison
from .plots import one_to_one_figure, residual_histogram_figure
from .registry import BASELINES, Baseline, CannonSettings, RunContext, baseline_kind, label_column

logger = logging.getLogger(__name__)

#: The registered baselines (:data:`~specabund.baselines.registry.BASELINES`).
BASE_MODELS: tuple[str, ...] = tuple(BASELINES)
MODEL_CHOICES: tuple[str, ...] = (*BASE_MODELS, "both", "all")
TREND_METRICS: tuple[str, ...] = (
    "val_rmse",
    "test_rmse",
    "test_robust_scatter",
    "test_bias",
    "test_r2",
    "fit_seconds",
)


def resolve_models(model_name: str) -> list[str]:
    """Concrete model names for ``'xgboost'``, ``'lightgbm'``, ``'cannon'``, ``'labels_only'``, ``'both'``
    (the two tree models) or ``'all'``."""
    name = model_name.lower()
    if name == "both":
        return ["xgboost", "lightgbm"]
    if name == "all":
        return list(BASE_MODELS)
    if name in BASELINES:
        return [name]
    raise ConfigError(f"model must be one of {MODEL_CHOICES}, got {model_name!r}")


def batch_results_dir(out_root: str | Path, element: str, model: str) -> Path:
    """``<out_root>/baseline_<element>_<model>_batch_results``."""
    return Path(out_root) / f"baseline_{element}_{model}_batch_results"


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

        self.kind = baseline_kind(model)
        self.target = label_column(dataset, element)
        split = dataset.split
        self.given: np.ndarray | None = None
        self.feature_names = self.kind.input_names(dataset, element)
        if self.feature_names is not None:
            self.given = np.column_stack([label_column(dataset, n) for n in self.feature_names])
        self.label_names = self.kind.label_names(dataset, element)
        self.labels = np.column_stack([label_column(dataset, n) for n in self.label_names])
        eligible = np.all(np.isfinite(self.labels), axis=1)
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
        self.ctx = RunContext(
            dataset=dataset,
            element=element,
            train_idx=self.train_idx,
            labels=self.labels,
            n_batches=n_batches,
            seed=self.seed,
            n_threads=n_threads,
            device=device,
            boosting=boosting_config,
            cannon=cannon,
            input_names=self.feature_names,
        )

    # ------------------------------------------------------------------ bookkeeping
    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def run_info(self) -> dict[str, Any]:
        cfg = self.kind.settings(self.ctx)
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
        return self.kind.model_file(self.models_dir, f"batch_{k}")

    # ------------------------------------------------------------------ model handling

    def _inputs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's inputs for rows ``idx``: the spectra, or the catalogue labels (labels-only)."""
        if self.given is not None:
            return self.given[idx], None
        return self.ds.X[idx], self.ds.ivar[idx]

    def new_model(self) -> Baseline:
        return self.kind.new(self.ctx)

    def load_model(self, k: int) -> Baseline:
        return self.kind.load(
            self.models_dir, f"batch_{k}", self.element, self.n_threads, self.device, self.n_batches
        )

    def save_model(self, model: Baseline, k: int) -> None:
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

    def fit_batch(self, model: Baseline, k: int) -> None:
        idx = self.batches[k - 1]
        X, iv = self._inputs(idx)
        Xv, ivv = self._inputs(self.val_idx)
        model.fit(X, iv, self.labels[idx], (Xv, ivv, self.target[self.val_idx]))

    def predict(self, model: Baseline, idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros(0)
        X, iv = self._inputs(idx)
        return model.predict(X, iv)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: Baseline, k: int, fit_seconds: float, n_seen: int) -> dict[str, Any]:
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
        row.update(model.batch_info())
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
) -> Baseline:
    """The model of the latest done batch of a run (no pickle involved).

    Returns
    -------
    Baseline
        ``.predict(X, ivar)`` gives ``element``; ``.model`` is the model itself
        (:class:`~specabund.baselines.BoostingRegressor`, :class:`~specabund.baselines.CannonModel` or
        :class:`~specabund.baselines.RegionalCannon`).
    """
    kind = baseline_kind(model)
    folder = batch_results_dir(out_root, element, model)
    done = BatchTracker(folder, f"{element}_{model}").completed()
    if not done:
        raise SpecabundError(f"{folder}: no finished batch, run the baseline first")
    return kind.load(folder / "models", f"batch_{max(done)}", element, n_threads, device)
