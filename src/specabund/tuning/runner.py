"""Batch hyperparameter optimisation: the optuna study, its objective and its resumption.

Rounds and batches
    The training split is shuffled once (``seed``) and cut into batches of ``batch_size_hyperopt``
    spectra. The trial in slot ``k`` (``k`` = the COMPLETE, PRUNED and live RUNNING trials numbered
    before it: the trial number less the FAILed ones) belongs to round ``r = k // trials_per_round`` and
    trains on the ``batches_per_round`` batches ``r * batches_per_round + j``
    (``j = 0 .. batches_per_round - 1``, modulo the number of batches): every round sees fresh spectra,
    successive rounds sweep the whole training split, and a trial never holds more than
    ``batches_per_round * batch_size_hyperopt`` spectra in memory on the device. The validation split is
    fixed, so validation losses of all rounds compare.

Pruning
    The validation loss of every epoch is reported to optuna through the trainer's epoch callback; a trial
    the pruner (median by default) judges hopeless stops there and is recorded PRUNED.

Counting and resuming
    ``n_trials`` is the study's total of COMPLETE + PRUNED trials. A new or resumed run first marks FAIL
    the trials left RUNNING by dead processes (see :mod:`specabund.tuning.storage`), then runs only the
    missing trials; the parameters of a trial killed with its worker are re-queued, so the rerun evaluates
    them next. With several processes on one study, a trial whose number comes after ``n_trials``
    finished or running trials is dropped at its start (recorded FAIL with ``user_attrs['surplus']``), so
    the processes together finish exactly ``n_trials`` trials.

Reproducibility
    Each trial gets a fresh sampler seeded with ``(seed, worker_id, slot)`` (``worker_id`` 0 when not given),
    and its round is derived from its slot, not its number. A single-process study killed (even with
    ``kill -9``) and rerun therefore ends with the same parameters, values and choices as an uninterrupted
    run; only the trial numbers after a killed trial are shifted by one (optuna never reuses a number).
    Not covered: the hyperband pruner (its brackets hash the trial number) and concurrent workers (the
    order in which they finish trials is not deterministic).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..config import TuningSection, parse_settings
from ..dataset import Dataset
from ..errors import ConfigError, DataMismatchError
from ..models import ModelConfig, build_model
from ..training import TrainConfig, load_model, train
from ..training.data import select_labels
from .space import SearchSpace, with_fields
from .storage import (
    count_claimed,
    count_done,
    fail_dead_trials,
    make_storage,
    resolve_storage,
    storage_errors,
    worker_identity,
)

logger = logging.getLogger(__name__)

METHODS = ("tpe", "grid", "random")
PRUNERS = ("median", "percentile", "hyperband", "none")
#: Keys of ``[tuning]`` read by :meth:`TuneOptions.from_config` (``group_ratios`` goes to the search space).
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TuningSection) if f.name != "group_ratios")
_DEFAULTS = TuningSection()

EpochHook = Callable[[optuna.Trial, int, dict[str, Any]], None]


class _SurplusTrial(Exception):
    """Raised at the start of a trial that would exceed ``n_trials`` (other workers claimed the rest)."""


@dataclass
class TuneOptions:
    """Settings of a tuning run (``[tuning]`` in the configuration; CLI flags override).

    Parameters
    ----------
    n_trials : int
        Total COMPLETE + PRUNED trials the study should hold.
    method : str
        ``'tpe'``, ``'grid'`` or ``'random'``.
    batch_size_hyperopt, batches_per_round : int
        Spectra per training batch and batches per round (see the module docstring).
    trials_per_round : int
        Trials that share a round's batches.
    epochs_per_trial : int
        Epochs each trial trains (at most; pruning stops earlier).
    timeout : float, optional
        Stop starting new trials after this many seconds (``None`` or 0: no limit).
    pruner : str
        ``'median'``, ``'percentile'`` (25th), ``'hyperband'`` or ``'none'``.
    pruner_startup_trials, pruner_warmup_epochs : int
        No pruning before this many trials finished / within the first epochs of a trial.
    grid_points : int
        Values per range for the grid sampler.
    storage : str
        Storage specification (see :mod:`specabund.tuning.storage`); empty for the default SQLite file.
    study_name : str
        Name of the study inside the storage.
    seed : int
        Seed of the batch partition, of the trials' training and (with ``worker_id``) of the sampler.
    worker_id : int, optional
        Part of the sampler seed ``(seed, worker_id, slot)`` of every trial (``None``: 0). Concurrent workers
        start trials in different slots, so they do not draw the same random start-up trials either way.
    keep_weights : bool
        Keep each trial's ``model.safetensors`` (otherwise only its ``metrics.csv``/``config.json``).
    """

    n_trials: int = _DEFAULTS.n_trials
    method: str = _DEFAULTS.method
    batch_size_hyperopt: int = _DEFAULTS.batch_size_hyperopt
    batches_per_round: int = _DEFAULTS.batches_per_round
    trials_per_round: int = _DEFAULTS.trials_per_round
    epochs_per_trial: int = _DEFAULTS.epochs_per_trial
    timeout: float | None = None
    pruner: str = _DEFAULTS.pruner
    pruner_startup_trials: int = _DEFAULTS.pruner_startup_trials
    pruner_warmup_epochs: int = _DEFAULTS.pruner_warmup_epochs
    grid_points: int = _DEFAULTS.grid_points
    storage: str = _DEFAULTS.storage
    study_name: str = _DEFAULTS.study_name
    seed: int = _DEFAULTS.seed
    worker_id: int | None = None
    keep_weights: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"tuning.method = {self.method!r}; allowed values: {', '.join(METHODS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"tuning.pruner = {self.pruner!r}; allowed values: {', '.join(PRUNERS)}")
        for key in (
            "n_trials",
            "batch_size_hyperopt",
            "batches_per_round",
            "trials_per_round",
            "epochs_per_trial",
        ):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"tuning.{key} = {getattr(self, key)!r}; must be >= 1")
        if self.batch_size_hyperopt < 2:
            raise ConfigError("tuning.batch_size_hyperopt must be >= 2")
        if self.pruner_startup_trials < 0 or self.pruner_warmup_epochs < 0:
            raise ConfigError("tuning.pruner_startup_trials and pruner_warmup_epochs must be >= 0")
        if self.grid_points < 2:
            raise ConfigError(f"tuning.grid_points = {self.grid_points}; must be >= 2")
        if self.timeout is not None and self.timeout <= 0:
            self.timeout = None
        if not self.study_name or any(c in self.study_name for c in "/\\"):
            raise ConfigError(
                f"tuning.study_name = {self.study_name!r}; must be a non-empty name without slashes"
            )

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **overrides: Any) -> TuneOptions:
        """Options from a ``[tuning]`` table, with ``overrides`` (``None`` values ignored).

        The table is validated by the configuration schema (:class:`~specabund.config.TuningSection`):
        an unknown key, a wrong type or a value out of range raises :class:`ConfigError` naming it.
        """
        checked = parse_settings({"tuning": dict(section)}).tuning
        data = {k: v for k, v in dataclasses.asdict(checked).items() if k != "group_ratios"}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneResult:
    """Outcome of :func:`run_tuning`.

    Attributes
    ----------
    study : optuna.Study
        The study (in its storage).
    storage : str
        Description of the storage (journal path or RDB URL).
    n_done : int
        COMPLETE + PRUNED trials in the study now.
    ran : list of int
        Numbers of the trials this call finished (COMPLETE or PRUNED).
    failed_stale : list of int
        Trials of dead workers this call marked FAIL.
    """

    study: optuna.Study
    storage: str
    n_done: int
    ran: list[int] = field(default_factory=list)
    failed_stale: list[int] = field(default_factory=list)


def batch_partition(n_train: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Indices of the training spectra cut into shuffled batches of ``batch_size`` (the last may be short)."""
    if n_train < 2:
        raise DataMismatchError(f"need at least 2 training spectra for tuning, got {n_train}")
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7A6E])).permutation(n_train)
    return [perm[s : s + batch_size] for s in range(0, n_train, batch_size)]


def round_batches(n_batches: int, batches_per_round: int, round_index: int) -> list[int]:
    """Batch numbers used in round ``round_index`` (consecutive, wrapping around the partition)."""
    k = min(batches_per_round, n_batches)
    return [(round_index * batches_per_round + j) % n_batches for j in range(k)]


def count_parameters(model_config: ModelConfig, n_pixels: int, n_labels: int) -> int:
    """Trainable parameters of the network ``model_config`` builds for the data."""
    net = build_model(model_config, n_pixels, n_labels)
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def make_sampler(
    method: str, space: SearchSpace, options: TuneOptions, sampler_seed: int
) -> optuna.samplers.BaseSampler:
    """The optuna sampler of ``method``."""
    if method == "grid":
        return optuna.samplers.GridSampler(space.grid(options.grid_points), seed=sampler_seed)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=sampler_seed)
    startup = max(2, min(10, options.n_trials // 3))
    return optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup, constant_liar=True)


def sampler_seed(seed: int, worker_id: int | None, slot: int) -> int:
    """The seed of the sampler of the trial in ``slot`` (see the module docstring)."""
    salt = 0 if worker_id is None else int(worker_id)
    return int(np.random.SeedSequence([int(seed), salt, int(slot)]).generate_state(1)[0])


class SlotSeededSampler(optuna.samplers.BaseSampler):
    """A fresh sampler of ``method`` for every trial, seeded from the trial's slot.

    The slot of a trial is the number of COMPLETE, PRUNED and live RUNNING trials numbered before it
    (:func:`~specabund.tuning.storage.count_claimed`). Unlike one sampler for the whole run, whose random
    stream restarts at each rerun, and unlike the trial number, which a killed trial shifts, the slot is
    the same for the n-th trial of an uninterrupted run and of a killed-then-resumed one. The grid sampler
    is handed the slot as the trial number, from which it takes the grid point of the first trials.
    """

    def __init__(self, method: str, space: SearchSpace, options: TuneOptions) -> None:
        self._method, self._space, self._options = method, space, options
        self._inner = make_sampler(method, space, options, sampler_seed(options.seed, options.worker_id, 0))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        slot = count_claimed(study, before=trial.number)
        seed = sampler_seed(self._options.seed, self._options.worker_id, slot)
        self._inner = make_sampler(self._method, self._space, self._options, seed)
        if self._method == "grid":
            trial = copy.copy(trial)
            trial.number = slot
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_pruner(options: TuneOptions) -> optuna.pruners.BasePruner:
    """The optuna pruner of ``options.pruner``."""
    if options.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=options.pruner_startup_trials, n_warmup_steps=options.pruner_warmup_epochs
        )
    if options.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=options.pruner_startup_trials, n_warmup_steps=options.pruner_warmup_epochs
        )
    if options.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=options.epochs_per_trial)
    return optuna.pruners.NopPruner()


def _val_loss_se(
    run_dir: Path, device: str, X: np.ndarray, ivar: np.ndarray, y: np.ndarray, model_config: ModelConfig
) -> tuple[float, float]:
    """Mean and standard error (over validation spectra) of the Gaussian NLL of the kept weights."""
    loaded = load_model(run_dir, device)
    with torch.inference_mode():
        mu, lv = loaded.predict_standardised(X, ivar)  # type: ignore[union-attr]
    lv = np.clip(lv, model_config.logvar_min, model_config.logvar_max)
    z = (y - loaded.scaler.mean) / loaded.scaler.std  # type: ignore[union-attr]
    nll = 0.5 * (lv + (z - mu) ** 2 * np.exp(-lv))
    nll = np.where(np.isfinite(z), nll, np.nan)
    per_spec = np.nanmean(nll, axis=1)
    n = len(per_spec)
    se = float(np.std(per_spec, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(np.nanmean(nll)), se


def _user_attr_jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _user_attr_jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _user_attr_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_user_attr_jsonable(v) for v in value]
    return value


def open_study(
    options: TuneOptions,
    output_dir: Path,
    *,
    space: SearchSpace | None = None,
) -> tuple[optuna.Study, str]:
    """Create or load the study named by ``options`` (``load_if_exists``); ``space`` sets the sampler."""
    _, loc = resolve_storage(options.storage, output_dir, options.study_name)
    with storage_errors(loc):
        storage, desc = make_storage(options.storage, output_dir, options.study_name)
        sampler = SlotSeededSampler(options.method, space, options) if space is not None else None
        study = optuna.create_study(
            storage=storage,
            study_name=options.study_name,
            direction="minimize",
            sampler=sampler,
            pruner=make_pruner(options),
            load_if_exists=True,
        )
    return study, desc


def run_tuning(
    train_data: Dataset,
    val_data: Dataset,
    labels: Sequence[str],
    space: SearchSpace,
    base_model: ModelConfig,
    base_train: TrainConfig,
    options: TuneOptions,
    output_dir: str | Path,
    *,
    epoch_hook: EpochHook | None = None,
    trial_callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
) -> TuneResult:
    """Run (or continue) the study until it holds ``options.n_trials`` COMPLETE + PRUNED trials.

    Parameters
    ----------
    train_data, val_data : Dataset
        Training spectra (cut into batches) and the fixed validation spectra.
    labels : sequence of str
        Labels to train on.
    space : SearchSpace
        The hyperparameters to tune.
    base_model, base_train : ModelConfig, TrainConfig
        Configuration of every trial before the sampled values are applied; ``base_train.epochs`` is
        replaced by ``options.epochs_per_trial`` and ``base_train.device`` must name a device.
    options : TuneOptions
        Study settings.
    output_dir : path
        ``results/hyperopt``: the default storage and the trials' run folders (``trials/<study>/``).
    epoch_hook : callable, optional
        ``hook(trial, epoch, row)`` after every epoch of every trial (after the loss was reported).
    trial_callbacks : sequence of callables
        Extra optuna callbacks ``cb(study, frozen_trial)`` after every trial.

    Returns
    -------
    TuneResult

    Raises
    ------
    StorageError
        When the storage fails (e.g. "database or disk is full"); finished trials stay in the study.
    """
    _, loc = resolve_storage(options.storage, Path(output_dir), options.study_name)
    with storage_errors(loc):
        return _run_tuning(
            train_data,
            val_data,
            labels,
            space,
            base_model,
            base_train,
            options,
            output_dir,
            epoch_hook=epoch_hook,
            trial_callbacks=trial_callbacks,
        )


def _run_tuning(
    train_data: Dataset,
    val_data: Dataset,
    labels: Sequence[str],
    space: SearchSpace,
    base_model: ModelConfig,
    base_train: TrainConfig,
    options: TuneOptions,
    output_dir: str | Path,
    *,
    epoch_hook: EpochHook | None,
    trial_callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
) -> TuneResult:
    labels = list(labels)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trial_train = with_fields(base_train, epochs=options.epochs_per_trial, plot_every=10**6)
    space.check(base_model, trial_train)
    n_pixels = train_data.n_pixels
    if val_data.n_pixels != n_pixels:
        raise DataMismatchError("training and validation data are on different wavelength grids")

    # fixed validation arrays for the standard error of the loss
    y_val = select_labels(val_data.y, val_data.elements, labels).astype(np.float64)
    keep = np.isfinite(y_val).any(axis=1)
    if not keep.any():
        raise DataMismatchError(f"validation data have no spectrum with any of the labels {labels}")
    val_X, val_ivar, y_val = val_data.X[keep], val_data.ivar[keep], y_val[keep]

    batches = batch_partition(len(train_data), options.batch_size_hyperopt, options.seed)
    trials_dir = output_dir / "trials" / options.study_name

    study, desc = open_study(options, output_dir, space=space)
    stale = fail_dead_trials(study)
    study.set_user_attr("labels", labels)
    study.set_user_attr("space", {p.name: p.to_dict() for p in space.params})
    study.set_user_attr("n_batches", len(batches))
    study.set_user_attr("n_train_total", len(train_data))
    study.set_user_attr("n_val", int(keep.sum()))
    study.set_user_attr("model_name", base_model.name)
    study.set_user_attr("group_ratios", list(space.group_ratios))
    study.set_user_attr("n_trials", options.n_trials)
    study.set_user_attr("epochs_per_trial", options.epochs_per_trial)
    study.set_user_attr("method", options.method)
    me = worker_identity()
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", me)
        fail_dead_trials(study)
        slot = count_claimed(study, before=trial.number)
        if slot >= options.n_trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise _SurplusTrial(f"trial {trial.number}: the study already has {options.n_trials} trials")
        params = space.suggest(trial)
        model_cfg, train_cfg = space.apply(params, base_model, trial_train)
        rnd = slot // options.trials_per_round
        batch_ids = round_batches(len(batches), options.batches_per_round, rnd)
        idx = np.sort(np.concatenate([batches[b] for b in batch_ids]))
        n_params = count_parameters(model_cfg, n_pixels, len(labels))
        trial.set_user_attr("round", rnd)
        trial.set_user_attr("batches", batch_ids)
        trial.set_user_attr("n_train", len(idx))
        trial.set_user_attr("n_params", n_params)
        losses: list[float] = []
        state = {"pruned_at": 0, "diverged": False}

        def on_epoch(epoch: int, row: dict[str, Any]) -> bool:
            v = float(row["val_loss"])
            losses.append(v)
            if not math.isfinite(v):
                state["diverged"] = True
                return True
            trial.report(v, epoch)
            if epoch_hook is not None:
                epoch_hook(trial, epoch, row)
            if trial.should_prune():
                state["pruned_at"] = epoch
                return True
            return False

        run_dir = trials_dir / f"trial_{trial.number:05d}"
        t0 = time.perf_counter()
        result = None
        try:
            result = train(
                train_data.subset(idx),
                val_data,
                labels,
                model_cfg,
                train_cfg,
                run_dir,
                callbacks=[on_epoch],
                overwrite=True,
                name=f"trial_{trial.number}",
            )
        except ConfigError:
            if not state["diverged"] and all(math.isfinite(v) for v in losses):
                raise
            state["diverged"] = True
        wall = time.perf_counter() - t0
        trial.set_user_attr("val_loss_per_epoch", _user_attr_jsonable(losses))
        trial.set_user_attr("wall_time_s", round(wall, 3))
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        if result is not None:
            trial.set_user_attr("final_val_loss", _user_attr_jsonable(result.best_val_loss))
            trial.set_user_attr("best_epoch", result.best_epoch)
            trial.set_user_attr("epochs_run", result.epochs_run)
            trial.set_user_attr(
                "rmse", _user_attr_jsonable({lab: m["rmse"] for lab, m in result.final_metrics.items()})
            )
        if state["diverged"]:
            trial.set_user_attr("diverged", True)
            raise optuna.TrialPruned(f"trial {trial.number}: validation loss not finite (diverged)")
        if state["pruned_at"]:
            trial.set_user_attr("pruned_at_epoch", state["pruned_at"])
            raise optuna.TrialPruned(f"trial {trial.number}: pruned after epoch {state['pruned_at']}")
        assert result is not None
        _, se = _val_loss_se(run_dir, train_cfg.device, val_X, val_ivar, y_val, model_cfg)
        trial.set_user_attr("val_loss_se", _user_attr_jsonable(se))
        if not options.keep_weights:
            (run_dir / "model.safetensors").unlink(missing_ok=True)
        return float(result.best_val_loss)

    def after_trial(st: optuna.Study, ft: FrozenTrial) -> None:
        if ft.state in (TrialState.COMPLETE, TrialState.PRUNED):
            ran.append(ft.number)
        if count_claimed(st) >= options.n_trials:
            st.stop()

    if options.method == "grid":
        size = space.grid_size(options.grid_points)
        logger.info("grid of %d points (%d trials requested)", size, options.n_trials)
        if size < options.n_trials:
            logger.warning("the grid has only %d points: the study stops when it is exhausted", size)
    budget = options.n_trials - count_claimed(study)
    if budget > 0:
        logger.info(
            "study %r (%s): %d of %d trials done, running up to %d more",
            options.study_name,
            desc,
            count_done(study),
            options.n_trials,
            budget,
        )
        study.optimize(
            objective,
            n_trials=budget,
            timeout=options.timeout,
            callbacks=[after_trial, *trial_callbacks],
            catch=(_SurplusTrial,),
            gc_after_trial=True,
        )
    else:
        logger.info("study %r already holds %d trials: nothing to run", options.study_name, count_done(study))
    return TuneResult(study=study, storage=desc, n_done=count_done(study), ran=ran, failed_stale=stale)
