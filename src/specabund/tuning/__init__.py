"""Hyperparameter tuning of the spectral CNN with optuna (``specabund tune``).

A study samples the hyperparameters declared in ``[tuning_space]`` (see :mod:`specabund.tuning.space`)
with TPE, a grid or random search, trains each trial for ``epochs_per_trial`` epochs on the round's fresh
batches of training spectra, evaluates on the fixed validation split and prunes poor trials epoch by epoch
(see :mod:`specabund.tuning.runner`). The study lives in on-disk storage and can be resumed, or worked on by
several processes at once:

* default: SQLite ``results/hyperopt/<study_name>.db`` (``--storage results/hyperopt/x.db``), for one
  process at a time;
* ``--storage results/hyperopt/<study_name>.log``: optuna ``JournalStorage`` on a ``JournalFileBackend``
  (append-only file plus lock file), for several processes on one machine or a shared disk;
* ``--storage postgresql://user@host/db`` (any SQLAlchemy URL): an RDB server, for many machines.

``n_trials`` is the study's total of COMPLETE + PRUNED trials: a resumed run only runs the missing ones,
trials left RUNNING by a killed process are marked FAIL and re-run. The report
(:mod:`specabund.tuning.report`) writes ``trials.csv``, plots, parameter importance,
``best_params.toml``, ``robust_params.toml`` and ``summary.txt`` to ``results/hyperopt/``.
"""

from __future__ import annotations

from .report import (
    BEST_FILE,
    ROBUST_FILE,
    ROBUST_RULE,
    select_best,
    select_robust,
    trials_frame,
    tuning_summary,
    write_report,
)
from .runner import (
    METHODS,
    PRUNERS,
    TuneOptions,
    TuneResult,
    batch_partition,
    count_parameters,
    open_study,
    round_batches,
    run_tuning,
)
from .space import (
    ParamSpec,
    SearchSpace,
    model_config_from_sections,
    parse_param,
    train_config_from_sections,
)
from .storage import StorageError, count_done, fail_dead_trials, make_storage, resolve_storage

__all__ = [
    "BEST_FILE",
    "METHODS",
    "PRUNERS",
    "ROBUST_FILE",
    "ROBUST_RULE",
    "ParamSpec",
    "SearchSpace",
    "StorageError",
    "TuneOptions",
    "TuneResult",
    "batch_partition",
    "count_done",
    "count_parameters",
    "fail_dead_trials",
    "make_storage",
    "model_config_from_sections",
    "open_study",
    "parse_param",
    "resolve_storage",
    "round_batches",
    "run_tuning",
    "select_best",
    "select_robust",
    "train_config_from_sections",
    "trials_frame",
    "tuning_summary",
    "write_report",
]
