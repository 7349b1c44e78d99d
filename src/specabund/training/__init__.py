"""Training, saved models and evaluation of the spectral CNN."""

from __future__ import annotations

from .data import AugmentConfig, Augmenter, LabelScaler, prepare_input
from .evaluate import evaluate, read_mist_iso
from .loss import gaussian_nll, masked_mse
from .saved import LoadedEnsemble, LoadedModel, load_model
from .trainer import TrainConfig, TrainResult, resolve_device, train, train_ensemble

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "LabelScaler",
    "LoadedEnsemble",
    "LoadedModel",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "gaussian_nll",
    "load_model",
    "masked_mse",
    "prepare_input",
    "read_mist_iso",
    "resolve_device",
    "train",
    "train_ensemble",
]
