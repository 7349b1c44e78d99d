"""The workflows of the commands (``preprocess``, ``train``, ``test``, ``predict``, ``analyze``, ``tune``).

One module per command: :mod:`.preprocess`, :mod:`.train`, :mod:`.evaluate` (``test``), :mod:`.predict`
(with the calibration), :mod:`.analyze`, :mod:`.tune`; :mod:`.common` holds the training data and label
choice shared by ``train`` and ``tune``.

A workflow resolves the run folder, the configuration, the data and the labels, runs the stage, writes its
outputs (atomically) and returns what happened; the command line only parses options, sets up logging,
threads and the device, calls these functions and prints the outcome. Nothing here prints, configures
logging, seeds a global random generator or picks a device: the caller passes the device.

Every folder name comes from :class:`~specabund.workspace.Workspace` (``[paths]`` of the configuration).
"""

from __future__ import annotations

from .analyze import ANALYSIS_TYPES, AnalysisPlan, plan_analysis, run_analysis
from .common import RESOLVED_CONFIG, build_configs, choose_labels, load_training_data
from .evaluate import EvaluationOutcome, evaluate_run
from .predict import PredictionOutcome, calibrate_run, predict_run
from .preprocess import preprocess_run
from .train import (
    TRAIN_ARGS_FILE,
    TrainingPlan,
    TrainOutcome,
    check_fresh_run_dir,
    plan_training,
    read_train_args,
    run_config,
    run_training,
)
from .tune import TuneOutcome, tune_run

__all__ = [
    "ANALYSIS_TYPES",
    "RESOLVED_CONFIG",
    "TRAIN_ARGS_FILE",
    "AnalysisPlan",
    "EvaluationOutcome",
    "PredictionOutcome",
    "TrainOutcome",
    "TrainingPlan",
    "TuneOutcome",
    "build_configs",
    "calibrate_run",
    "check_fresh_run_dir",
    "choose_labels",
    "evaluate_run",
    "load_training_data",
    "plan_analysis",
    "plan_training",
    "predict_run",
    "preprocess_run",
    "read_train_args",
    "run_analysis",
    "run_config",
    "run_training",
    "tune_run",
]
