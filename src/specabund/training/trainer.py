"""Training loop: AdamW, LR schedule, early stopping, augmentation, checkpoints and resume.

Determinism: every random stream is seeded from ``TrainConfig.seed``. Shuffling and augmentation use
their own ``torch.Generator`` objects. Dropout and weight initialisation can only use torch's global
generator, so :func:`train` seeds it from the config seed *inside* ``torch.random.fork_rng``, which
restores the caller's global RNG state afterwards; the global state used during training is saved in the
checkpoint, so a resumed run continues the identical random sequence. On the CPU two runs with the same
config, data and thread count give bit-identical weights; on CUDA ``deterministic=True`` asks torch for
deterministic kernels (``warn_only``) for the duration of the call.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`train` trains with
DistributedDataParallel (see :mod:`specabund.training.distributed`): ``batch_size`` is the global batch,
split over the processes, each taking its shard of a ``DistributedSampler``; validation is split and
gathered; rank 0 alone writes and decides when to stop. Every process must be given the same data and run
folder. Ranks other than 0 use their own dropout and augmentation streams, all saved in the checkpoint, so a
resumed distributed run (with the same number of processes) equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from torch import nn

from .. import __version__
from ..dataset import Dataset
from ..errors import ConfigError, DataMismatchError
from ..metrics import regression_metrics
from ..models import ModelConfig, build_model
from ..plotting import save_figure
from ..store import LazyRows
from ..tracking import BatchTracker
from ..utils import atomic_write, hash_json, reject_unknown_keys
from . import distributed, plots
from .data import (
    AugmentConfig,
    Augmenter,
    LabelScaler,
    batch_order,
    chunk_buffer_order,
    device_rows,
    prepare_input,
    select_labels,
    training_rows,
)
from .distributed import DistContext
from .loss import LOSSES, masked_mse, training_loss
from .saved import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ENSEMBLE_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    data_hash,
    grid_info,
    load_checkpoint,
    save_checkpoint,
    save_weights,
    write_config,
)

logger = logging.getLogger(__name__)

SCHEDULERS = ("onecycle", "cosine", "plateau", "none")
METRIC_KEYS = ("mae", "rmse", "robust_scatter", "bias", "r2")
#: TrainConfig fields that may change between an interrupted run and its resumption.
RESUME_FREE_FIELDS = ("device", "num_threads", "plot_every", "eval_batch_size")

Callback = Callable[[int, dict[str, Any]], bool | None]


def resolve_device(name: str | torch.device) -> torch.device:
    """``'auto'`` -> CUDA when available else CPU; ``'cpu'``/``'cuda'``/``'cuda:1'`` as given.

    Raises
    ------
    ConfigError
        When CUDA is requested but not available.
    """
    if isinstance(name, torch.device):
        return name
    name = str(name).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r} (use 'auto', 'cpu' or 'cuda')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available in this torch build/machine")
    return dev


@dataclass
class TrainConfig:
    """Optimisation settings.

    Parameters
    ----------
    batch_size, learning_rate, weight_decay, epochs
        AdamW on mini-batches (weight decay only on weights of rank >= 2, not on biases/norms).
    early_stopping : int
        Stop after this many epochs without a validation-loss improvement larger than ``min_delta``
        (0 disables).
    grad_clip : float
        Maximum global gradient norm (0 disables).
    scheduler : str
        ``'onecycle'`` (per batch, peak ``learning_rate``), ``'cosine'`` (per batch down to
        ``min_lr``), ``'plateau'`` (per epoch on the validation loss) or ``'none'``.
    loss : str
        ``'nll'`` (Gaussian negative log-likelihood), ``'beta_nll'`` (NLL weighted by ``sigma**(2 beta)``)
        or ``'mse'`` (squared error for the mean, NLL for the variance around the detached mean); see
        :mod:`specabund.training.loss`. The validation value of the same loss selects the best epoch.
    beta : float
        The exponent of ``'beta_nll'``.
    use_label_errors : bool
        Where the dataset carries catalogue errors of the labels (``Dataset.y_err``), the likelihood uses
        ``sigma^2 = sigma_model^2 + sigma_label^2``: the predicted variance is the model's own, and noisy
        labels count for less.
    mse_warmup_epochs : int
        First epochs trained on the masked MSE of the means before switching to ``loss``.
    freeze_epochs : int
        With ``train(..., init_from=RUN)``: the first epochs train only the head (the convolutional trunk
        taken from the parent run is frozen, its batch-norm statistics too), then everything.
    augment : AugmentConfig
        Augmentation probabilities and strengths.
    seed : int
        Seed of every random stream (initialisation, dropout, shuffling, augmentation).
    num_threads : int
        ``torch.set_num_threads`` during training (0 keeps the current value; restored afterwards).
    device : str
        ``'cpu'``, ``'cuda'`` or ``'auto'`` (resolved with :func:`resolve_device`).
    amp : bool
        Mixed precision (autocast with ``amp_dtype``, ``'bf16'`` or ``'fp16'``) on CUDA only.
    deterministic : bool
        Request deterministic kernels during training.
    plot_every : int
        Refresh the training plots every this many epochs (and at the end).
    """

    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    epochs: int = 200
    early_stopping: int = 20
    min_delta: float = 0.0
    grad_clip: float = 1.0
    scheduler: str = "onecycle"
    onecycle_pct_start: float = 0.15
    min_lr: float = 1e-6
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    loss: str = "mse"
    beta: float = 0.5
    use_label_errors: bool = True
    mse_warmup_epochs: int = 0
    freeze_epochs: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 42
    num_threads: int = 0
    device: str = "cpu"
    amp: bool = False
    amp_dtype: str = "bf16"
    deterministic: bool = True
    eval_batch_size: int = 512
    plot_every: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ConfigError("learning_rate must be > 0 and weight_decay >= 0")
        if self.early_stopping < 0 or self.grad_clip < 0 or self.mse_warmup_epochs < 0:
            raise ConfigError("early_stopping, grad_clip and mse_warmup_epochs must be >= 0")
        if self.freeze_epochs < 0:
            raise ConfigError(f"freeze_epochs must be >= 0, got {self.freeze_epochs}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss = {self.loss!r}; allowed values: {', '.join(LOSSES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must lie in [0, 1], got {self.beta}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler = {self.scheduler!r}; allowed values: {', '.join(SCHEDULERS)}")
        if self.amp_dtype not in ("bf16", "fp16"):
            raise ConfigError(f"amp_dtype = {self.amp_dtype!r}; allowed values: bf16, fp16")
        if not 0 < self.onecycle_pct_start < 1:
            raise ConfigError("onecycle_pct_start must lie in (0, 1)")
        if self.plot_every < 1 or self.eval_batch_size < 1 or self.num_threads < 0:
            raise ConfigError("plot_every and eval_batch_size must be >= 1, num_threads >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        reject_unknown_keys(cls, data, "training config keys")
        return cls(**data)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    run_dir : Path
        The saved-model folder.
    best_epoch : int
        Epoch whose weights were kept.
    best_val_loss : float
        Validation loss (Gaussian NLL, standardised units) at that epoch.
    epochs_run : int
        Epochs completed (including those of an interrupted run that was resumed).
    stopped_early : bool
        Whether early stopping (or a callback) ended training before ``epochs``.
    history : pandas.DataFrame
        One row per epoch (the content of ``metrics.csv``).
    final_metrics : dict
        Per-label validation metrics (physical units) at the best epoch.
    """

    run_dir: Path
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    history: pd.DataFrame
    final_metrics: dict[str, dict[str, float]]


@dataclass
class _Tensors:
    X: torch.Tensor
    ivar: torch.Tensor
    y: torch.Tensor  # standardised, NaN for missing
    y_phys: np.ndarray
    label_var: torch.Tensor | None = None  # standardised catalogue variance of the labels, NaN unknown


def _label_errors(ds: Dataset, labels: list[str], what: str) -> np.ndarray | None:
    """Catalogue errors of ``labels`` (rows with any label kept, as in :func:`_prepare_split`), or None."""
    if ds.y_err is None:
        return None
    y = select_labels(ds.y, ds.elements, labels)
    e = select_labels(ds.y_err, ds.elements, labels)[np.isfinite(y).any(axis=1)]
    if not np.isfinite(e).any():
        return None
    logger.info("%s: catalogue errors for %d of %d label values", what, int(np.isfinite(e).sum()), e.size)
    return np.where(np.isfinite(e) & (e >= 0), e, np.nan).astype(np.float32)


def _prepare_split(ds: Dataset, labels: list[str], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = select_labels(ds.y, ds.elements, labels)
    keep = np.isfinite(y).any(axis=1)
    if not keep.any():
        raise DataMismatchError(f"{what} data have no spectrum with any of the labels {labels}")
    n_drop = int((~keep).sum())
    if n_drop:
        logger.info("%s: dropping %d spectra without any of the labels %s", what, n_drop, labels)
    X, ivar = training_rows(ds.X, keep), training_rows(ds.ivar, keep)  # lazy for an on-disk store
    return X, ivar, y[keep]


def _to_tensors(
    X: np.ndarray,
    ivar: np.ndarray,
    y: np.ndarray,
    scaler: LabelScaler,
    dev: torch.device,
    err: np.ndarray | None = None,
) -> _Tensors:
    label_var = None
    if err is not None:
        label_var = torch.from_numpy(((err / scaler.std) ** 2).astype(np.float32)).to(dev)
    return _Tensors(
        X=device_rows(X, dev),  # StreamingRows for an on-disk store
        ivar=device_rows(ivar, dev),
        y=torch.from_numpy(scaler.transform(y)).to(dev),
        y_phys=y.astype(np.float64),
        label_var=label_var,
    )


def _memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev)) / 2**20
    return float(psutil.Process().memory_info().rss) / 2**20


@contextlib.contextmanager
def _torch_runtime(cfg: TrainConfig, dev: torch.device) -> Iterator[None]:
    """Thread count, deterministic flags and a forked global RNG for the duration of training."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    )
    try:
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        # fork_rng restores the caller's global RNG state on exit; inside, train() seeds it.
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.learning_rate, total_steps=total, pct_start=cfg.onecycle_pct_start
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.min_lr)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
    return None


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a final batch of a single spectrum is dropped (batch norm needs 2)."""
    perm = torch.randperm(n, generator=gen)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


def _steps_per_epoch(n: int, batch_size: int) -> int:
    k = math.ceil(n / batch_size)
    if k > 1 and n % batch_size == 1:
        k -= 1
    return k


@torch.inference_mode()
def _evaluate_rows(
    model: nn.Module,
    data: _Tensors,
    in_channels: int,
    cfg: TrainConfig,
    dev: torch.device,
    start: int,
    stop: int,
) -> tuple[float, int, np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of a split: the loss summed over the label values, their number, and the
    standardised mean and log-variance."""
    model.eval()
    total, count = 0.0, 0
    n_lab = int(data.y.shape[1])
    mus, lvs = [np.zeros((0, n_lab))], [np.zeros((0, n_lab))]
    for s in range(start, stop, cfg.eval_batch_size):
        e = min(s + cfg.eval_batch_size, stop)
        xb, vb, yb = data.X[s:e], data.ivar[s:e], data.y[s:e]
        eb = data.label_var[s:e] if data.label_var is not None else None
        with _autocast(cfg, dev):
            mu, lv = model(prepare_input(xb, vb, in_channels))
        mu, lv = mu.float(), lv.float()
        k = int(torch.isfinite(yb).sum())
        total += float(training_loss(cfg.loss, mu, lv, yb, beta=cfg.beta, label_var=eb)) * k
        count += k
        mus.append(mu.double().cpu().numpy())
        lvs.append(lv.double().cpu().numpy())
    return total, count, np.concatenate(mus), np.concatenate(lvs)


def _evaluate_split(
    model: nn.Module, data: _Tensors, in_channels: int, cfg: TrainConfig, dev: torch.device
) -> tuple[float, np.ndarray, np.ndarray]:
    """Validation loss (``cfg.loss``, standardised units) and the standardised mean and log-variance."""
    total, count, mu, lv = _evaluate_rows(model, data, in_channels, cfg, dev, 0, len(data.X))
    return total / max(count, 1), mu, lv


def _autocast(cfg: TrainConfig, dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.amp and dev.type == "cuda":
        dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def _label_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, dict[str, float]]:
    return {lab: regression_metrics(y_true[:, j], y_pred[:, j]) for j, lab in enumerate(labels)}


def _write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    with atomic_write(path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    return df


def _fingerprint(
    model_config: ModelConfig,
    train_config: TrainConfig,
    labels: list[str],
    hashes: dict[str, str],
    world_size: int = 1,
) -> str:
    tc = {k: v for k, v in train_config.to_dict().items() if k not in RESUME_FREE_FIELDS}
    spec: dict[str, Any] = {"model": model_config.to_dict(), "train": tc, "labels": labels, **hashes}
    if world_size > 1:  # the data order and the steps per epoch depend on it
        spec["world_size"] = world_size
    return hash_json(spec)


def _refresh_plots(
    plot_dir: Path,
    name: str,
    history: pd.DataFrame,
    labels: list[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sigma: np.ndarray,
    epoch: int,
    which: str = "epoch",
) -> None:
    fig = plots.training_curves_figure(history, labels, title=f"{name}: training ({which} {epoch})")
    save_figure(fig, plot_dir / f"{name}_training_curves.png")
    fig = plots.pred_vs_true_figure(
        y_true, y_pred, sigma, labels, title=f"{name}: validation, {which} {epoch}"
    )
    save_figure(fig, plot_dir / f"{name}_pred_vs_true.png")


def train(
    dataset_train: Dataset,
    dataset_val: Dataset,
    labels: Sequence[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    callbacks: Sequence[Callback] | None = None,
    plot_dir: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    init_from: str | Path | None = None,
    train_sharded: bool = False,
) -> TrainResult:
    """Train a network and save it as a run folder (see :mod:`specabund.training.saved`).

    Parameters
    ----------
    dataset_train, dataset_val : Dataset
        Training and validation data on the same wavelength grid and with the same ``preprocess_hash``.
        Spectra without any of ``labels`` are dropped; single missing labels are masked in the loss.
    labels : sequence of str
        Labels to predict (columns of ``dataset.elements``), in output order.
    model_config : ModelConfig
        Architecture (``model_config.name`` must be registered).
    train_config : TrainConfig
        Optimisation settings.
    run_dir : path
        Output folder: ``model.safetensors``, ``config.json``, ``checkpoint.pt``, ``metrics.csv``.
    resume : bool
        Continue the run in ``run_dir`` from its last checkpoint. The data and configuration must be the
        same (fields in ``RESUME_FREE_FIELDS`` excepted); a finished run is returned as it is. The result
        equals that of an uninterrupted run.
    callbacks : sequence of callables
        ``cb(epoch, row)`` after each epoch (once the checkpoint is written); returning ``True`` stops
        training as if early stopping had triggered.
    plot_dir : path, optional
        Folder for per-epoch tracking (``BatchTracker``, one row per epoch) and plots refreshed every
        ``train_config.plot_every`` epochs.
    progress : bool
        Show a tqdm progress bar over epochs.
    overwrite : bool
        Start afresh even if ``run_dir`` holds a run (otherwise that raises ``ConfigError``).
    name : str, optional
        Prefix of the plot and summary files (default: the labels joined by ``'_'``).
    extra_config : mapping, optional
        JSON-serialisable entries added to ``config.json`` (e.g. ``preprocess_options`` so that prediction
        can preprocess raw FITS files exactly like the training data). Not part of the resume fingerprint.
    init_from : path, optional
        A trained run folder (e.g. a model trained on simulated spectra) to start from: its architecture
        replaces ``model_config``, every weight whose name and shape match is copied (the whole network
        when the labels are the same; the trunk and the head's hidden layer when they differ, with a new
        output layer), the label standardisation is refitted on the new labels, and
        ``train_config.freeze_epochs`` first epochs train only the head. ``config.json`` records the
        parent (``init_from``: folder, labels, weights hash).

    train_sharded : bool
        Under torchrun: ``dataset_train`` is already this process's own shard (e.g. read by rank from a
        store) rather than the whole training set; it is then used as it is instead of through a
        ``DistributedSampler``. The label standardisation, label range and data hash are those of all
        shards together; every epoch takes as many steps as the smallest shard allows. Ignored without
        torchrun.

    Under ``torchrun`` every process calls this with the same arguments (module docstring); rank 0 writes
    the outputs and the callbacks run on rank 0 only (their request to stop is passed to every rank).

    Returns
    -------
    TrainResult
    """
    labels = list(labels)
    if not labels:
        raise ConfigError("no labels to train on")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"duplicate labels in {labels}")
    if not np.array_equal(dataset_train.wavelength, dataset_val.wavelength):
        raise DataMismatchError("training and validation data are on different wavelength grids")
    if dataset_train.preprocess_hash != dataset_val.preprocess_hash:
        raise DataMismatchError(
            f"training and validation data differ in preprocess_hash "
            f"({dataset_train.preprocess_hash!r} vs {dataset_val.preprocess_hash!r})"
        )
    run_dir = Path(run_dir)
    name = name or "_".join(labels)
    cfg = train_config
    dev = resolve_device(cfg.device)
    ctx = distributed.context()
    if ctx.enabled:
        dev, cfg = _rank_device_and_threads(dev, cfg, ctx)
        rank_batch_size(cfg.batch_size, ctx.world_size)  # fail early, on every rank
        dirs = distributed.all_gather(str(run_dir.resolve()))
        if len(set(dirs)) > 1:
            raise ConfigError(f"the torchrun processes were given different run folders: {sorted(set(dirs))}")
    if cfg.amp and dev.type != "cuda":
        logger.info("amp requested on %s: mixed precision is used on CUDA only; training in float32", dev)

    parent: dict[str, Any] | None = None
    if init_from is not None:
        parent = _parent_run(Path(init_from), dataset_train)
        model_config = parent["model_config"]
    elif cfg.freeze_epochs:
        raise ConfigError("freeze_epochs needs a parent run to start from (init_from)")

    Xt, vt, yt = _prepare_split(dataset_train, labels, "training")
    Xv, vv, yv = _prepare_split(dataset_val, labels, "validation")
    scaler = LabelScaler.fit(yt, labels)
    hashes = {"train_data_hash": data_hash(Xt, vt, yt), "val_data_hash": data_hash(Xv, vv, yv)}
    et = ev = None
    if cfg.use_label_errors:
        et = _label_errors(dataset_train, labels, "training")
        ev = _label_errors(dataset_val, labels, "validation")
        if et is not None:
            hashes["train_label_err_hash"] = data_hash(et[:, :1], et[:, :1], et)
    train_labels = None
    train_sharded = train_sharded and ctx.enabled
    if train_sharded:
        scaler, hashes, train_labels = _combine_shards(yt, hashes, labels)
    if parent is not None:
        hashes["init_from_weights"] = parent["weights_sha256"]
    fingerprint = _fingerprint(model_config, cfg, labels, hashes, ctx.world_size)
    swap = None
    extra_config = dict(extra_config or {})
    if cfg.augment.enabled and cfg.augment.swap_prob > 0:
        from .swap import AbundanceSwap

        t_swap = time.perf_counter()

        keep = np.isfinite(select_labels(dataset_train.y, dataset_train.elements, labels)).any(axis=1)
        swap = AbundanceSwap.build(
            cfg.augment.swap_prob,
            labels,
            yt,
            dataset_train.wavelength,
            dataset_train.teff[keep],
            dataset_train.logg[keep],
            dataset_train.fe_h[keep],
            scaler.std,
        )
        if swap is not None:
            extra_config["abundance_swap"] = {
                "labels": [labels[c] for c in swap.cols],
                "stars": len(swap.response),
                "response_on_disk": swap.response.on_disk,
                "setup_seconds": round(time.perf_counter() - t_swap, 1),
            }

    ckpt_path = run_dir / CHECKPOINT_FILE
    state: dict[str, Any] | None = None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)  # every rank reads the same checkpoint
        if int(state.get("world_size", 1)) != ctx.world_size and not state.get("finished"):
            raise ConfigError(
                f"{run_dir}: cannot resume, the run was trained by {state.get('world_size', 1)} process(es) "
                f"and this launch has {ctx.world_size}; resume with the same --nproc-per-node"
            )
        expected = fingerprint
        if state.get("finished") and int(state.get("world_size", 1)) != ctx.world_size:
            # a finished run is returned as it is, whatever number of processes trained it
            expected = _fingerprint(model_config, cfg, labels, hashes, int(state.get("world_size", 1)))
        if state.get("fingerprint") != expected:
            raise ConfigError(
                f"{run_dir}: cannot resume, the checkpoint was made with a different configuration, label "
                "set or data; use another run folder or overwrite"
            )
    elif not overwrite and any((run_dir / f).exists() for f in (CHECKPOINT_FILE, WEIGHTS_FILE)):
        raise ConfigError(f"{run_dir} already holds a training run; pass resume=True or overwrite=True")
    run_dir.mkdir(parents=True, exist_ok=True)

    with _torch_runtime(cfg, dev):
        return _train_loop(
            run_dir=run_dir,
            labels=labels,
            model_config=model_config,
            cfg=cfg,
            dev=dev,
            train_np=(Xt, vt, yt),
            val_np=(Xv, vv, yv),
            errors=(et, ev),
            scaler=scaler,
            hashes=hashes,
            fingerprint=fingerprint,
            state=state,
            wavelength=dataset_train.wavelength,
            preprocess_hash=dataset_train.preprocess_hash,
            callbacks=list(callbacks or []),
            plot_dir=Path(plot_dir) if plot_dir is not None else None,
            progress=progress,
            name=name,
            extra_config=extra_config,
            parent=parent,
            ctx=ctx,
            train_labels=train_labels,
            swap=swap,
        )


def _combine_shards(
    y: np.ndarray, hashes: dict[str, str], labels: list[str]
) -> tuple[LabelScaler, dict[str, str], np.ndarray]:
    """Label standardisation, data hashes and labels of the whole training set from every rank's shard."""
    parts = distributed.all_gather((y, hashes))
    y_all = np.concatenate([p[0] for p in parts])
    keys = sorted({k for _, h in parts for k in h})
    combined = {k: hash_json([h.get(k) for _, h in parts]) for k in keys}
    return LabelScaler.fit(y_all, labels), combined, y_all.astype(np.float64)


def _rank_device_and_threads(
    dev: torch.device, cfg: TrainConfig, ctx: DistContext
) -> tuple[torch.device, TrainConfig]:
    """Under torchrun: GPU ``LOCAL_RANK`` on CUDA; on the CPU the threads shared among the local ranks."""
    if dev.type == "cuda":
        return torch.device("cuda", ctx.local_rank), cfg
    if cfg.num_threads > 0 and ctx.local_world_size > 1:
        cfg = copy.copy(cfg)
        cfg.num_threads = max(1, cfg.num_threads // ctx.local_world_size)
    return dev, cfg


def _parent_run(run_dir: Path, dataset: Dataset) -> dict[str, Any]:
    """Weights, architecture and provenance of the run to fine-tune from (must fit the data's grid)."""
    from ..utils import hash_file
    from .saved import LoadedModel, load_model

    loaded = load_model(run_dir, "cpu")
    if not isinstance(loaded, LoadedModel):
        raise ConfigError(
            f"{run_dir}: fine-tuning starts from a single model, not an ensemble (use a member)"
        )
    if int(loaded.grid["n"]) != dataset.n_pixels:
        raise DataMismatchError(
            f"{run_dir}: the parent model reads {loaded.grid['n']} pixels, the data have {dataset.n_pixels}; "
            "preprocess the data with the parent's wavelength grid"
        )
    return {
        "model_config": loaded.model_config,
        "state": {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()},
        "labels": list(loaded.labels),
        "weights_sha256": hash_file(loaded.run_dir / WEIGHTS_FILE),
        "run_dir": str(loaded.run_dir),
        "preprocess_hash": loaded.preprocess_hash,
    }


def _load_parent_weights(model: nn.Module, parent: dict[str, Any], labels: list[str]) -> list[str]:
    """Copy the parent's weights whose names and shapes match; returns the names copied.

    With other labels than the parent's, the output layer (last head layer) is left freshly initialised
    even if its shape happens to match, since its rows mean other labels.
    """
    own = model.state_dict()
    head_out = _output_layer_prefix(model)
    same_labels = list(parent["labels"]) == list(labels)
    copied = {}
    for k, v in parent["state"].items():
        if k not in own or own[k].shape != v.shape:
            continue
        if not same_labels and head_out is not None and k.startswith(head_out):
            continue
        copied[k] = v
    model.load_state_dict({**own, **copied})
    return sorted(copied)


def _output_layer_prefix(model: nn.Module) -> str | None:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return f"{last}." if last else None


def _set_trunk_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or release) every parameter outside ``model.head``; frozen batch norms use their stored
    statistics (eval mode) so that the parent's normalisation is kept."""
    for name, p in model.named_parameters():
        if not name.startswith("head."):
            p.requires_grad_(not frozen)
    if frozen:
        for name, m in model.named_modules():
            if not name.startswith("head") and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@dataclass
class _Setup:
    """What one training run works with (built by :func:`_build_setup`, unchanged by the epochs)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_scaler: torch.amp.GradScaler
    use_scaler: bool
    augmenter: Augmenter
    train_t: _Tensors
    val_t: _Tensors
    shuffle_gen: torch.Generator
    aug_gen: torch.Generator
    extra_config: dict[str, Any]
    ctx: DistContext = field(default_factory=DistContext)
    #: the module trained (``model`` wrapped in DistributedDataParallel under torchrun, else ``model``)
    net: nn.Module | None = None
    #: spectra per optimiser step on this rank
    batch_size: int = 0
    #: under torchrun: shards the training set over the ranks, reshuffled every epoch
    sampler: torch.utils.data.DistributedSampler[int] | None = None
    #: steps per epoch when the ranks hold shards of different sizes (0: all batches)
    max_steps: int = 0
    #: under torchrun with an on-disk training store: seed of the per-epoch chunk order shared by the ranks
    store_seed: int | None = None
    #: physical labels of the whole training set when ``train_t`` holds only this rank's shard
    train_labels: np.ndarray | None = None

    #: abundance-swap augmentation (:mod:`specabund.training.swap`), or None
    swap: Any = None

    @property
    def all_train_y(self) -> np.ndarray:
        return self.train_labels if self.train_labels is not None else self.train_t.y_phys

    @property
    def trained(self) -> nn.Module:
        return self.net if self.net is not None else self.model


@dataclass
class _Progress:
    """Bookkeeping carried from epoch to epoch and saved in the checkpoint."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    epoch: int = 0
    finished: bool = False
    stopped_early: bool = False


@dataclass
class _Validation:
    """One pass over the validation set."""

    loss: float
    mu: np.ndarray  # standardised means
    lv: np.ndarray  # standardised log-variances
    pred: np.ndarray  # physical means
    metrics: dict[str, dict[str, float]]


def _seeded_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Shuffling and augmentation generators derived from the config seed."""
    seeds = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(seeds[0])), torch.Generator().manual_seed(int(seeds[1]))


def _rank_seed(seed: int, rank: int) -> int:
    """Seed of the dropout and augmentation streams of rank ``rank > 0`` (rank 0 keeps ``seed``'s)."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def store_rank_steps(chunk_of_row: np.ndarray, batch_size: int, world_size: int) -> int:
    """Steps per epoch that every rank can take when the chunks of a store are dealt round-robin.

    Whatever the permutation, each rank gets at least ``n_chunks // world_size`` chunks, so at least the
    rows of that many of the smallest chunks; that many full batches are taken by every rank every epoch.

    Raises
    ------
    ConfigError
        When the store has fewer chunks than processes, or a rank would not fill one batch.
    """
    sizes = np.sort(np.bincount(np.unique(chunk_of_row, return_inverse=True)[1]))
    per_rank = len(sizes) // world_size
    if per_rank == 0:
        raise ConfigError(
            f"the training store has {len(sizes)} chunk(s) for {world_size} processes; write it with smaller "
            "chunks (preprocess --chunk-size) or launch fewer processes"
        )
    least = int(sizes[:per_rank].sum())
    steps = least // int(batch_size)
    if steps < 1:
        raise ConfigError(
            f"each of the {world_size} processes gets at least {least} training spectra from the store's "
            f"chunks, fewer than one batch of {batch_size}"
        )
    return steps


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Spectra per step on each rank: ``batch_size`` is the global batch, split over the ranks.

    Raises
    ------
    ConfigError
        When fewer than 2 spectra per rank would remain (batch norm needs 2).
    """
    per = batch_size // world_size
    if per < 2:
        raise ConfigError(
            f"batch_size {batch_size} over {world_size} processes leaves {per} spectra per process; "
            "batch norm needs at least 2 (raise batch_size)"
        )
    return per


def _build_setup(
    *,
    labels: list[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    dev: torch.device,
    train_np: tuple[np.ndarray, np.ndarray, np.ndarray],
    val_np: tuple[np.ndarray, np.ndarray, np.ndarray],
    errors: tuple[np.ndarray | None, np.ndarray | None],
    scaler: LabelScaler,
    wavelength: np.ndarray,
    parent: dict[str, Any] | None,
    extra_config: dict[str, Any],
    ctx: DistContext | None = None,
    train_labels: np.ndarray | None = None,
    swap: Any = None,
) -> _Setup:
    """Seeded generators, the model (with the parent's weights), optimiser, schedulers and tensors;
    under torchrun also the DistributedDataParallel wrapper and the distributed sampler."""
    ctx = ctx or DistContext()
    # The global generator is forked by _torch_runtime (restored on exit); seeding it here makes weight
    # initialisation and dropout reproducible from the config seed.
    torch.manual_seed(cfg.seed)
    shuffle_gen, aug_gen = _seeded_generators(cfg.seed)
    n_pixels = int(train_np[0].shape[1])
    model = build_model(model_config, n_pixels, len(labels))
    if parent is not None:
        copied = _load_parent_weights(model, parent, labels)
        logger.info(
            "initialised %d of %d tensors from %s", len(copied), len(model.state_dict()), parent["run_dir"]
        )
        extra_config = {
            **extra_config,
            "init_from": {
                "run_dir": parent["run_dir"],
                "labels": parent["labels"],
                "weights_sha256": parent["weights_sha256"],
                "preprocess_hash": parent["preprocess_hash"],
                "tensors_copied": len(copied),
                "freeze_epochs": cfg.freeze_epochs,
            },
        }
    model = model.to(dev)
    n_train = len(train_np[0])
    net, sampler, batch_size = None, None, cfg.batch_size
    steps = _steps_per_epoch(n_train, batch_size)
    max_steps = 0
    store_seed = None
    if ctx.enabled:
        sharded = train_labels is not None
        # an on-disk store is dealt to the ranks by chunks (each reads only its own), not by random rows
        by_chunk = not sharded and isinstance(train_np[0], LazyRows)
        net, sampler, batch_size = _distribute(
            model,
            cfg,
            dev,
            ctx,
            n_train,
            parent is not None,
            "caller" if sharded else "chunks" if by_chunk else "",
        )
        if sampler is not None:
            steps = _steps_per_epoch(sampler.num_samples, batch_size)
        elif by_chunk:
            store_seed = int(np.random.SeedSequence([cfg.seed, 2]).generate_state(1)[0])
            chunk_of_row = train_np[0].base_rows // train_np[0].chunk_rows
            steps = max_steps = store_rank_steps(chunk_of_row, batch_size, ctx.world_size)
        else:  # own shard: every rank must take the same number of steps
            steps = max_steps = min(distributed.all_gather(_steps_per_epoch(n_train, batch_size)))
        if ctx.rank > 0:  # own dropout masks and augmentations (identical initial weights on all ranks)
            torch.manual_seed(_rank_seed(cfg.seed, ctx.rank))
            aug_gen.manual_seed(_rank_seed(cfg.seed + 1, ctx.rank))
            shuffle_gen.manual_seed(_rank_seed(cfg.seed + 2, ctx.rank))
    optimizer = _make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg, steps)
    use_scaler = cfg.amp and dev.type == "cuda" and cfg.amp_dtype == "fp16"
    return _Setup(
        ctx=ctx,
        net=net,
        batch_size=batch_size,
        sampler=sampler,
        max_steps=max_steps,
        store_seed=store_seed,
        train_labels=train_labels,
        swap=swap.to(dev) if swap is not None else None,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        grad_scaler=torch.amp.GradScaler("cuda", enabled=use_scaler),
        use_scaler=use_scaler,
        augmenter=Augmenter(cfg.augment, wavelength),
        train_t=_to_tensors(*train_np, scaler, dev, errors[0]),
        val_t=_to_tensors(*val_np, scaler, dev, errors[1]),
        shuffle_gen=shuffle_gen,
        aug_gen=aug_gen,
        extra_config=extra_config,
    )


def _distribute(
    model: nn.Module,
    cfg: TrainConfig,
    dev: torch.device,
    ctx: DistContext,
    n_train: int,
    fine_tune: bool,
    sharded: str = "",
) -> tuple[nn.Module, torch.utils.data.DistributedSampler[int] | None, int]:
    """The DistributedDataParallel wrapper, the sampler sharding the training rows (none when the data are
    already this rank's shard), the per-rank batch."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    batch_size = rank_batch_size(cfg.batch_size, ctx.world_size)
    net = DistributedDataParallel(
        model,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        # with freeze_epochs the frozen trunk receives no gradients for a while
        find_unused_parameters=fine_tune and cfg.freeze_epochs > 0,
    )
    shuffle_seed = int(np.random.SeedSequence(cfg.seed).generate_state(1, dtype=np.uint32)[0])
    sampler = None
    if not sharded:
        sampler = DistributedSampler(
            range(n_train), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=shuffle_seed
        )
    if ctx.is_primary:
        logger.info(
            "DistributedDataParallel over %d processes: %d spectra per process and step (global batch %d), "
            "%s",
            ctx.world_size,
            batch_size,
            batch_size * ctx.world_size,
            f"{_steps_per_epoch(sampler.num_samples, batch_size)} steps per epoch"
            if sampler is not None
            else "training data sharded by the caller"
            if sharded == "caller"
            else "the training store's chunks dealt to the processes",
        )
    return net, sampler, batch_size


def _epoch_batches(setup: _Setup, epoch: int) -> list[torch.Tensor]:
    """This rank's shuffled index batches of ``epoch``: the whole training set in one process, its shard
    of the distributed sampler (reshuffled with ``set_epoch``) under torchrun. Every rank gets the same
    number of batches; a final batch of a single spectrum is dropped."""
    if setup.sampler is None:
        # a store's rows come chunk by chunk (shuffled chunks, then rows within a buffer of chunks)
        n = len(setup.train_t.X)
        if setup.store_seed is not None:
            # under torchrun: the same chunk permutation on every rank (seeded by epoch, so a resumed run
            # draws it again), each rank keeping chunks[rank::world_size]
            gen = torch.Generator().manual_seed(setup.store_seed + epoch)
            rows = setup.train_t.X.chunk_of_row
            bs, ctx = setup.batch_size or 1, setup.ctx
            b = chunk_buffer_order(rows, bs, gen, rank=ctx.rank, world_size=ctx.world_size)
            out = [torch.from_numpy(x) for x in b]
        else:
            out = batch_order(setup.train_t.X, n, setup.batch_size or 1, setup.shuffle_gen, _batches)
        return out[: setup.max_steps] if setup.max_steps else out
    setup.sampler.set_epoch(epoch)
    idx = torch.tensor(list(setup.sampler), dtype=torch.long)
    out = list(torch.split(idx, setup.batch_size))
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


def _restore(setup: _Setup, state: dict[str, Any] | None, dev: torch.device) -> _Progress:
    """Load a checkpoint into the setup (weights, optimiser, schedulers, random streams) and return its
    bookkeeping; a fresh :class:`_Progress` without one."""
    if state is None:
        return _Progress()
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    if setup.scheduler is not None and state.get("scheduler") is not None:
        setup.scheduler.load_state_dict(state["scheduler"])
    if state.get("grad_scaler"):
        setup.grad_scaler.load_state_dict(state["grad_scaler"])
    rng = state
    ranks = state.get("rank_rng")
    if setup.ctx.enabled and ranks is not None and len(ranks) == setup.ctx.world_size:
        rng = ranks[setup.ctx.rank]  # this rank's own dropout and augmentation streams
    torch.set_rng_state(rng["rng_torch"])
    if dev.type == "cuda" and "rng_cuda" in rng:
        torch.cuda.set_rng_state(rng["rng_cuda"], dev)
    setup.shuffle_gen.set_state(rng.get("rng_shuffle", state["rng_shuffle"]))
    setup.aug_gen.set_state(rng["rng_augment"])
    return _Progress(
        history=list(state["history"]),
        best_val=float(state["best_val"]),
        best_epoch=int(state["best_epoch"]),
        best_state=state["best_state"],
        bad_epochs=int(state["bad_epochs"]),
        epoch=int(state["epoch"]),
        finished=bool(state["finished"]),
        stopped_early=bool(state.get("stopped_early", False)),
    )


def _train_epoch(
    setup: _Setup,
    batches: Sequence[torch.Tensor],
    *,
    cfg: TrainConfig,
    model_config: ModelConfig,
    dev: torch.device,
    use_mse: bool,
) -> tuple[float, int]:
    """One pass of optimiser steps over ``batches`` (index tensors into the training tensors).

    Returns the sum of the batch losses weighted by batch size, and the number of spectra.
    """
    model, opt, gs, data = setup.trained, setup.optimizer, setup.grad_scaler, setup.train_t
    loss_sum, loss_n = 0.0, 0
    for idx in batches:
        idx_d = idx.to(dev)
        xb, vb = setup.augmenter(data.X[idx_d], data.ivar[idx_d], setup.aug_gen)
        yb = data.y[idx_d]
        if setup.swap is not None:
            xb, vb, yb = setup.swap(xb, vb, yb, idx, data.y, setup.aug_gen)
        eb = data.label_var[idx_d] if data.label_var is not None else None
        with _autocast(cfg, dev):
            mu, lv = model(prepare_input(xb, vb, model_config.in_channels))
        loss = (
            masked_mse(mu, yb)
            if use_mse
            else training_loss(
                cfg.loss,
                mu,
                lv,
                yb,
                model_config.logvar_min,
                model_config.logvar_max,
                cfg.beta,
                label_var=eb,
            )
        )
        opt.zero_grad(set_to_none=True)
        gs.scale(loss).backward()
        if cfg.grad_clip > 0:
            gs.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        gs.step(opt)
        gs.update()
        if setup.scheduler is not None and cfg.scheduler in ("onecycle", "cosine"):
            setup.scheduler.step()
        loss_sum += float(loss.detach()) * len(idx)
        loss_n += len(idx)
    return loss_sum, loss_n


def _validate(
    setup: _Setup,
    cfg: TrainConfig,
    in_channels: int,
    dev: torch.device,
    scaler: LabelScaler,
    labels: list[str],
) -> _Validation:
    """Validation loss, predictions and per-label metrics (physical units) of the current weights.

    Under torchrun every rank predicts a contiguous share of the validation set (with rank 0's batch-norm
    statistics) and the shares are gathered, so every rank holds the metrics of the whole set.
    """
    ctx = setup.ctx
    if not ctx.enabled:
        loss, mu, lv = _evaluate_split(setup.model, setup.val_t, in_channels, cfg, dev)
    else:
        _sync_buffers(setup.model)
        n = len(setup.val_t.X)
        lo, hi = ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size
        parts = distributed.all_gather(
            _evaluate_rows(setup.model, setup.val_t, in_channels, cfg, dev, lo, hi)
        )
        loss = sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)
        mu, lv = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
    pred = scaler.inverse(mu)
    return _Validation(loss, mu, lv, pred, _label_metrics(setup.val_t.y_phys, pred, labels))


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank: DDP broadcasts them at the start of
    each training forward, so after an epoch the ranks hold the statistics of their own last batch."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, src=0)


def _reduce_sums(loss_sum: float, loss_n: int, setup: _Setup, dev: torch.device) -> tuple[float, int]:
    """Training-loss sums of all ranks (the local ones when not distributed)."""
    if not setup.ctx.enabled:
        return loss_sum, loss_n
    import torch.distributed as dist

    t = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t[0]), int(t[1])


def _update_best(prog: _Progress, epoch: int, val_loss: float, model: nn.Module, cfg: TrainConfig) -> bool:
    """Keep the weights of an improved epoch, count the others; whether early stopping triggers."""
    if val_loss < prog.best_val - cfg.min_delta:
        prog.best_val, prog.best_epoch, prog.bad_epochs = val_loss, epoch, 0
        prog.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        prog.bad_epochs += 1
    return cfg.early_stopping > 0 and prog.bad_epochs >= cfg.early_stopping


def _epoch_row(
    epoch: int,
    train_loss: float,
    val: _Validation,
    *,
    use_mse: bool,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    best_epoch: int,
    labels: list[str],
) -> dict[str, Any]:
    """The ``metrics.csv`` row of one epoch (timing and memory are added by the caller)."""
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val.loss,
        "loss_kind": "mse_warmup" if use_mse else cfg.loss,
        "lr": float(optimizer.param_groups[0]["lr"]),
        "best_epoch": best_epoch,
    }
    for lab in labels:
        for key in METRIC_KEYS:
            row[f"{lab}_{key}"] = val.metrics[lab][key]
    return row


def _checkpoint(setup: _Setup, prog: _Progress, fingerprint: str, dev: torch.device) -> dict[str, Any]:
    """Everything needed to continue after ``prog.epoch`` exactly as an uninterrupted run would."""
    ckpt = {
        "fingerprint": fingerprint,
        "epoch": prog.epoch,
        "model": {k: v.detach().cpu() for k, v in setup.model.state_dict().items()},
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
        "grad_scaler": setup.grad_scaler.state_dict() if setup.use_scaler else {},
        "history": prog.history,
        "best_val": prog.best_val,
        "best_epoch": prog.best_epoch,
        "best_state": prog.best_state,
        "bad_epochs": prog.bad_epochs,
        "finished": False,
        "stopped_early": prog.stopped_early,
        "rng_torch": torch.get_rng_state(),
        "rng_shuffle": setup.shuffle_gen.get_state(),
        "rng_augment": setup.aug_gen.get_state(),
    }
    if dev.type == "cuda":
        ckpt["rng_cuda"] = torch.cuda.get_rng_state(dev)
    if setup.ctx.enabled:  # every rank's own random streams (a collective: all ranks call this)
        mine = {k: ckpt[k] for k in ("rng_torch", "rng_shuffle", "rng_augment", "rng_cuda") if k in ckpt}
        ckpt["rank_rng"] = distributed.all_gather(mine)
        ckpt["world_size"] = setup.ctx.world_size
    return ckpt


def _saved_config(
    *,
    setup: _Setup,
    prog: _Progress,
    labels: list[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    scaler: LabelScaler,
    wavelength: np.ndarray,
    preprocess_hash: str,
    hashes: dict[str, str],
    final_metrics: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The content of ``config.json``."""
    y_phys = setup.all_train_y
    return {
        "format_version": 1,
        "specabund_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_config.to_dict(),
        "train": cfg.to_dict(),
        "labels": labels,
        "label_mean": scaler.mean.tolist(),
        "label_std": scaler.std.tolist(),
        "wavelength": grid_info(wavelength),
        "preprocess_hash": str(preprocess_hash),
        **hashes,
        "n_train": len(y_phys),
        "n_val": len(setup.val_t.X),
        "best_epoch": prog.best_epoch,
        "best_val_loss": prog.best_val,
        "epochs_run": len(prog.history),
        "stopped_early": prog.stopped_early,
        "final_metrics": final_metrics,
        "label_range": {
            "min": np.nanmin(np.where(np.isfinite(y_phys), y_phys, np.inf), axis=0).tolist(),
            "max": np.nanmax(np.where(np.isfinite(y_phys), y_phys, -np.inf), axis=0).tolist(),
        },
        **setup.extra_config,
    }


def _best_metrics(prog: _Progress, val_t: _Tensors, labels: list[str]) -> dict[str, dict[str, float]]:
    """Per-label validation metrics of the best epoch, with the number of validation values."""
    best_row = next(r for r in prog.history if int(r["epoch"]) == prog.best_epoch)
    final_metrics = {lab: {k: best_row[f"{lab}_{k}"] for k in METRIC_KEYS} for lab in labels}
    for lab in labels:
        final_metrics[lab]["n"] = int(np.isfinite(val_t.y_phys[:, labels.index(lab)]).sum())
    return final_metrics


def _mark_checkpoint_finished(path: Path, stopped_early: bool) -> None:
    final_state = load_checkpoint(path)
    if not final_state.get("finished"):
        final_state["finished"] = True
        final_state["stopped_early"] = stopped_early
        save_checkpoint(path, final_state)


def _train_loop(
    *,
    run_dir: Path,
    labels: list[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    dev: torch.device,
    train_np: tuple[np.ndarray, np.ndarray, np.ndarray],
    val_np: tuple[np.ndarray, np.ndarray, np.ndarray],
    scaler: LabelScaler,
    hashes: dict[str, str],
    fingerprint: str,
    state: dict[str, Any] | None,
    wavelength: np.ndarray,
    preprocess_hash: str,
    callbacks: list[Callback],
    plot_dir: Path | None,
    progress: bool,
    name: str,
    extra_config: dict[str, Any],
    parent: dict[str, Any] | None = None,
    errors: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
    ctx: DistContext | None = None,
    train_labels: np.ndarray | None = None,
    swap: Any = None,
) -> TrainResult:
    """Build the run (:func:`_build_setup`), restore a checkpoint (:func:`_restore`), run the epochs
    (:func:`_train_epoch`, :func:`_validate`, :func:`_update_best`, :func:`_checkpoint`) and write the
    saved model (:func:`_finish`).

    Under torchrun (``ctx.enabled``) every rank trains its shard and validates its share; rank 0 alone
    writes ``metrics.csv``, the plots, the checkpoint and the saved model and runs the callbacks; its
    decision to stop (early stopping or a callback) is broadcast to the others.
    """
    ctx = ctx or DistContext()
    primary = ctx.is_primary
    setup = _build_setup(
        labels=labels,
        model_config=model_config,
        cfg=cfg,
        dev=dev,
        train_np=train_np,
        val_np=val_np,
        errors=errors,
        scaler=scaler,
        wavelength=wavelength,
        parent=parent,
        extra_config=extra_config,
        ctx=ctx,
        train_labels=train_labels,
        swap=swap,
    )
    prog = _restore(setup, state, dev)
    if state is not None:
        logger.info("resuming %s after epoch %d", run_dir, prog.epoch)

    tracker = BatchTracker(plot_dir, name) if plot_dir is not None and primary else None
    bar = None
    if progress and not prog.finished and primary:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=prog.epoch, desc=f"train {name}", unit="epoch")
    in_ch = model_config.in_channels
    val: _Validation | None = None
    try:
        for epoch in range(prog.epoch + 1, cfg.epochs + 1):
            if prog.finished:
                break
            t0 = time.perf_counter()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            setup.model.train()
            _set_trunk_frozen(setup.model, parent is not None and epoch <= cfg.freeze_epochs)
            use_mse = epoch <= cfg.mse_warmup_epochs
            loss_sum, loss_n = _train_epoch(
                setup,
                _epoch_batches(setup, epoch),
                cfg=cfg,
                model_config=model_config,
                dev=dev,
                use_mse=use_mse,
            )
            loss_sum, loss_n = _reduce_sums(loss_sum, loss_n, setup, dev)
            train_loss = loss_sum / max(loss_n, 1)
            val = _validate(setup, cfg, in_ch, dev, scaler, labels)
            if cfg.scheduler == "plateau" and setup.scheduler is not None:
                setup.scheduler.step(val.loss)
            stop = _update_best(prog, epoch, val.loss, setup.model, cfg)
            row = _epoch_row(
                epoch,
                train_loss,
                val,
                use_mse=use_mse,
                cfg=cfg,
                optimizer=setup.optimizer,
                best_epoch=prog.best_epoch,
                labels=labels,
            )
            row["epoch_time_s"] = time.perf_counter() - t0
            row["memory_mb"] = _memory_mb(dev)
            prog.history.append(row)
            prog.epoch = epoch
            prog.finished = stop or epoch == cfg.epochs
            prog.stopped_early = stop
            ckpt = _checkpoint(setup, prog, fingerprint, dev)
            if primary:
                df = _write_metrics_csv(run_dir / METRICS_FILE, prog.history)
                if tracker is not None and plot_dir is not None:
                    tracker.record(epoch, {k: v for k, v in row.items() if k not in ("epoch", "loss_kind")})
                    if epoch % cfg.plot_every == 0 or prog.finished:
                        sig = np.exp(0.5 * val.lv) * scaler.std
                        _refresh_plots(plot_dir, name, df, labels, setup.val_t.y_phys, val.pred, sig, epoch)
                save_checkpoint(run_dir / CHECKPOINT_FILE, ckpt)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val.loss:.3f}", best=prog.best_epoch)
                for cb in callbacks:
                    if cb(epoch, dict(row)):
                        prog.finished = prog.stopped_early = True
            if ctx.enabled:  # rank 0 decides (its callbacks may stop the run)
                prog.finished, prog.stopped_early = distributed.broadcast((prog.finished, prog.stopped_early))
            if prog.finished:
                break
    finally:
        if bar is not None:
            bar.close()
    return _finish(
        setup=setup,
        prog=prog,
        run_dir=run_dir,
        labels=labels,
        model_config=model_config,
        cfg=cfg,
        dev=dev,
        scaler=scaler,
        wavelength=wavelength,
        preprocess_hash=preprocess_hash,
        hashes=hashes,
        tracker=tracker,
        plot_dir=plot_dir,
        name=name,
        validated=val is not None,
    )


def _finish(
    *,
    setup: _Setup,
    prog: _Progress,
    run_dir: Path,
    labels: list[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    dev: torch.device,
    scaler: LabelScaler,
    wavelength: np.ndarray,
    preprocess_hash: str,
    hashes: dict[str, str],
    tracker: BatchTracker | None,
    plot_dir: Path | None,
    name: str,
    validated: bool,
) -> TrainResult:
    """Keep the best weights and write the saved model: weights, ``config.json``, the checkpoint marked
    finished and the final plots (pred-vs-true of the kept weights). Under torchrun rank 0 writes and the
    other ranks wait for it."""
    if prog.best_state is None:
        raise ConfigError(f"{run_dir}: no epoch was completed")
    model = setup.model
    model.load_state_dict(prog.best_state)
    final_metrics = _best_metrics(prog, setup.val_t, labels)
    if setup.ctx.is_primary:
        _write_outputs(
            setup=setup,
            prog=prog,
            run_dir=run_dir,
            labels=labels,
            model_config=model_config,
            cfg=cfg,
            dev=dev,
            scaler=scaler,
            wavelength=wavelength,
            preprocess_hash=preprocess_hash,
            hashes=hashes,
            tracker=tracker,
            plot_dir=plot_dir,
            name=name,
            validated=validated,
            final_metrics=final_metrics,
        )
    distributed.barrier()
    return TrainResult(
        run_dir=run_dir,
        best_epoch=prog.best_epoch,
        best_val_loss=prog.best_val,
        epochs_run=len(prog.history),
        stopped_early=prog.stopped_early,
        history=pd.DataFrame(prog.history),
        final_metrics=final_metrics,
    )


def _write_outputs(
    *,
    setup: _Setup,
    prog: _Progress,
    run_dir: Path,
    labels: list[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    dev: torch.device,
    scaler: LabelScaler,
    wavelength: np.ndarray,
    preprocess_hash: str,
    hashes: dict[str, str],
    tracker: BatchTracker | None,
    plot_dir: Path | None,
    name: str,
    validated: bool,
    final_metrics: dict[str, dict[str, float]],
) -> None:
    """Weights, ``config.json``, the finished checkpoint and the final plots of the kept weights."""
    model = setup.model
    save_weights(run_dir / WEIGHTS_FILE, model)
    config = _saved_config(
        setup=setup,
        prog=prog,
        labels=labels,
        model_config=model_config,
        cfg=cfg,
        scaler=scaler,
        wavelength=wavelength,
        preprocess_hash=preprocess_hash,
        hashes=hashes,
        final_metrics=final_metrics,
    )
    write_config(run_dir, config)
    _mark_checkpoint_finished(run_dir / CHECKPOINT_FILE, prog.stopped_early)
    if tracker is not None and plot_dir is not None:
        tracker.finalize(["train_loss", "val_loss", "lr", *(f"{lab}_rmse" for lab in labels)])
        if validated:
            # pred-vs-true of the kept (best) weights
            _, mu_b, lv_b = _evaluate_split(model, setup.val_t, model_config.in_channels, cfg, dev)
            _refresh_plots(
                plot_dir,
                name,
                pd.DataFrame(prog.history),
                labels,
                setup.val_t.y_phys,
                scaler.inverse(mu_b),
                np.exp(0.5 * lv_b) * scaler.std,
                prog.best_epoch,
                which="best epoch",
            )


def train_ensemble(
    dataset_train: Dataset,
    dataset_val: Dataset,
    labels: Sequence[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    run_dir: str | Path,
    n_members: int,
    resume: bool = False,
    callbacks: Sequence[Callback] | None = None,
    plot_dir: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    train_sharded: bool = False,
    init_from: str | Path | None = None,
) -> list[TrainResult]:
    """Train ``n_members`` networks with seeds ``seed + k`` in ``run_dir/member_<k>``.

    Writes ``run_dir/ensemble.json`` (member folders) so that :func:`~specabund.training.load_model`
    returns a :class:`~specabund.training.saved.LoadedEnsemble`. Plots of member ``k`` go to
    ``plot_dir/member_<k>``. With ``init_from`` every member is fine-tuned from that same (single-model)
    run; the members then differ in their new head's initialisation, shuffling and augmentation. Other
    parameters as in :func:`train`.
    """
    if n_members < 1:
        raise ConfigError(f"ensemble size must be >= 1, got {n_members}")
    run_dir = Path(run_dir)
    results = []
    members = []
    for k in range(n_members):
        member_cfg = copy.deepcopy(train_config)
        member_cfg.seed = train_config.seed + k
        sub = f"member_{k}"
        results.append(
            train(
                dataset_train,
                dataset_val,
                labels,
                model_config,
                member_cfg,
                run_dir / sub,
                resume=resume,
                callbacks=callbacks,
                plot_dir=Path(plot_dir) / sub if plot_dir is not None else None,
                progress=progress,
                overwrite=overwrite,
                name=name,
                extra_config=extra_config,
                train_sharded=train_sharded,
                init_from=init_from,
            )
        )
        members.append(sub)
    from ..utils import atomic_write_json

    if distributed.is_primary():
        atomic_write_json(
            run_dir / ENSEMBLE_FILE,
            {
                "n_members": n_members,
                "members": members,
                "seeds": [train_config.seed + k for k in range(n_members)],
            },
        )
    distributed.barrier()
    return results


__all__ = [
    "CONFIG_FILE",
    "RESUME_FREE_FIELDS",
    "TrainConfig",
    "TrainResult",
    "resolve_device",
    "train",
    "train_ensemble",
]
