"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``; this folder is on
``sys.path`` then)."""

from __future__ import annotations

import dataclasses
from typing import Any


def default_sections(report_ignored: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copies of the ``[model]`` and ``[training]`` sections of the default configuration.

    Parameters
    ----------
    report_ignored : bool
        Print the ``[training]`` keys that are not fields of ``TrainConfig`` (they are dropped).

    Returns
    -------
    model, training : dict
        The model section (with its ``name``) and the training keys ``TrainConfig`` takes.
    """
    from specabund.config import load_config
    from specabund.training.trainer import TrainConfig

    cfg = load_config(None)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    training = dict(cfg["training"])
    ignored = sorted(set(training) - known)
    if report_ignored and ignored:
        print(f"[training] keys not for TrainConfig (ignored here): {ignored}")
    return dict(cfg["model"]), {k: v for k, v in training.items() if k in known}


def build_configs(model: dict[str, Any], training: dict[str, Any]) -> tuple[Any, Any]:
    """``(ModelConfig, TrainConfig)`` from a model section (with ``name``) and training keys."""
    from specabund.models.registry import default_config
    from specabund.training.trainer import TrainConfig

    m = dict(model)
    return default_config(m.pop("name", "rescnn"), **m), TrainConfig.from_dict(training)


def configs(**training_overrides: Any) -> tuple[Any, Any]:
    """The default model and training configurations with ``training_overrides`` applied."""
    model, training = default_sections()
    training.update(training_overrides)
    return build_configs(model, training)
