"""The hyperparameter search space declared in ``[tuning_space]`` and its mapping onto the training library.

Each key of ``[tuning_space]`` declares one hyperparameter, as an inline table::

    learning_rate = {low = 1e-4, high = 3e-3, log = true}   # float range (log-uniform)
    blocks_per_group = {low = 1, high = 3, step = 1}         # int range (both ends ints)
    batch_size = {choices = [32, 64, 128]}                   # categorical

The name says where the value goes:

* a field of :class:`~specabund.models.ModelConfig` (``dropout``, ``kernel_size``, ``blocks_per_group``,
  ``stem_channels``, ``head_hidden``, ...) -> ``[model]``;
* a field of :class:`~specabund.training.TrainConfig` (``learning_rate``, ``batch_size``,
  ``weight_decay``, ``grad_clip``, ...) -> ``[training]``;
* a field of :class:`~specabund.training.AugmentConfig` (``noise_max_factor``, ``rv_max_kms``, ...) ->
  ``[training.augment]``;
* two derived parameters: ``group_width`` sets ``model.group_channels = group_width * group_ratios``
  (``[tuning] group_ratios``, default ``[1, 2, 3]``: the widths of the three residual groups), and
  ``augment_strength`` scales every augmentation strength relative to the library defaults
  (``noise_max_factor = 1 + s * (default - 1)``, ``rv_max_kms``, ``continuum_scale`` and
  ``continuum_tilt`` times ``s``; ``s = 0`` switches augmentation off in effect).

An optional ``target = "model.kernel_size"`` (or ``"training.x"``, ``"augment.x"``) overrides the lookup.
``name = false`` removes a hyperparameter declared by the defaults (it keeps its ``[model]``/``[training]``
value), since a user file overlays ``[tuning_space]`` key by key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import optuna

from ..config import parse_settings
from ..errors import ConfigError
from ..models import ModelConfig
from ..training import AugmentConfig, TrainConfig

DERIVED = ("group_width", "augment_strength")
_MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"name"}
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"augment", "device", "epochs", "seed"}
_AUGMENT_FIELDS = {f.name for f in fields(AugmentConfig)} - {"enabled"}
#: Augmentation strengths scaled by ``augment_strength``.
STRENGTH_FIELDS = ("noise_max_factor", "rv_max_kms", "continuum_scale", "continuum_tilt")


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter.

    Attributes
    ----------
    name : str
        Parameter name (the optuna parameter name).
    target : str
        ``'model.<field>'``, ``'training.<field>'``, ``'augment.<field>'`` or ``'derived.<name>'``.
    kind : str
        ``'float'``, ``'int'`` or ``'categorical'``.
    low, high : float or int, optional
        Range ends (inclusive) for ``float``/``int``.
    log : bool
        Log-uniform range.
    step : float or int, optional
        Step of a discretised range.
    choices : tuple, optional
        Allowed values of a categorical parameter.
    """

    name: str
    target: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask ``trial`` for a value of this parameter."""
        if self.kind == "categorical":
            assert self.choices is not None
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self, points: int) -> list[Any]:
        """Values used by the grid sampler: the choices, or ``points`` values spread over the range."""
        if self.kind == "categorical":
            assert self.choices is not None
            return list(self.choices)
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        if self.kind == "int":
            step = int(self.step or 1)
            allv = list(range(int(lo), int(hi) + 1, step))
            if len(allv) <= points:
                return allv
            idx = np.unique(np.round(np.linspace(0, len(allv) - 1, points)).astype(int))
            return [allv[i] for i in idx]
        vals = np.geomspace(lo, hi, points) if self.log else np.linspace(lo, hi, points)
        if self.step:
            vals = lo + np.round((vals - lo) / self.step) * self.step
        return sorted({float(v) for v in vals})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target, "kind": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices or ())
        else:
            d.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                d["step"] = self.step
        return d


def _target_of(name: str, explicit: Any) -> str:
    if explicit is not None:
        target = str(explicit)
        section, _, key = target.partition(".")
        allowed = {"model": _MODEL_FIELDS, "training": _TRAIN_FIELDS, "augment": _AUGMENT_FIELDS}
        if section not in allowed or key not in allowed[section]:
            raise ConfigError(
                f"tuning_space.{name}: target {target!r} is not model.<ModelConfig field>, "
                "training.<TrainConfig field> or augment.<AugmentConfig field>"
            )
        return target
    if name in DERIVED:
        return f"derived.{name}"
    if name in _MODEL_FIELDS:
        return f"model.{name}"
    if name in _TRAIN_FIELDS:
        return f"training.{name}"
    if name in _AUGMENT_FIELDS:
        return f"augment.{name}"
    raise ConfigError(
        f"tuning_space.{name}: unknown hyperparameter; use a field of ModelConfig "
        f"({', '.join(sorted(_MODEL_FIELDS))}), TrainConfig ({', '.join(sorted(_TRAIN_FIELDS))}), "
        f"AugmentConfig ({', '.join(sorted(_AUGMENT_FIELDS))}), one of {DERIVED}, or give target = ..."
    )


def parse_param(name: str, spec: Any) -> ParamSpec:
    """Turn one ``[tuning_space]`` entry into a :class:`ParamSpec` (``ConfigError`` when malformed)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"tuning_space.{name} must be a table such as {{low = 1e-4, high = 1e-2, log = true}} "
            f"or {{choices = [32, 64]}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices", "target"})
    if unknown:
        raise ConfigError(
            f"tuning_space.{name}: unknown keys {unknown} (allowed: low, high, log, step, choices, target)"
        )
    target = _target_of(name, spec.get("target"))
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"tuning_space.{name}.choices must be a non-empty list")
        if any(isinstance(c, (list, dict)) for c in choices):
            raise ConfigError(f"tuning_space.{name}.choices must hold numbers, strings or booleans")
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"tuning_space.{name}.choices has duplicates: {choices}")
        if any(k in spec for k in ("low", "high", "log", "step")):
            raise ConfigError(f"tuning_space.{name}: give either choices or low/high, not both")
        return ParamSpec(name=name, target=target, kind="categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"tuning_space.{name}: a range needs low and high (or give choices)")
    low, high = spec["low"], spec["high"]
    for v in (low, high):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"tuning_space.{name}: low/high must be numbers")
    if not low < high:
        raise ConfigError(f"tuning_space.{name}: need low < high, got {low} and {high}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"tuning_space.{name}: a log range needs low > 0")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise ConfigError(f"tuning_space.{name}.step must be a positive number")
    if log and step is not None:
        raise ConfigError(f"tuning_space.{name}: log and step cannot be combined")
    is_int = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
    return ParamSpec(
        name=name,
        target=target,
        kind="int" if is_int else "float",
        low=low,
        high=high,
        log=log,
        step=step,
    )


@dataclass(frozen=True)
class SearchSpace:
    """The parsed ``[tuning_space]`` plus the settings of the derived parameters."""

    params: tuple[ParamSpec, ...]
    group_ratios: tuple[float, ...] = (1.0, 2.0, 3.0)

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], group_ratios: Sequence[float] = (1, 2, 3)
    ) -> SearchSpace:
        """Parse a ``[tuning_space]`` table (see the module docstring)."""
        params = tuple(parse_param(str(k), v) for k, v in section.items() if v is not False)
        if not params:
            raise ConfigError("[tuning_space] is empty: declare at least one hyperparameter to tune")
        targets = [p.target for p in params]
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            raise ConfigError(f"[tuning_space] sets {dup} more than once")
        if "derived.group_width" in targets and "model.group_channels" in targets:
            raise ConfigError("[tuning_space]: group_width and group_channels cannot both be tuned")
        ratios = tuple(float(r) for r in group_ratios)
        if len(ratios) != 3 or min(ratios) <= 0:
            raise ConfigError(f"tuning.group_ratios must be three positive numbers, got {list(group_ratios)}")
        return cls(params=params, group_ratios=ratios)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def by_name(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter through ``trial``."""
        return {p.name: p.suggest(trial) for p in self.params}

    def grid(self, points: int) -> dict[str, list[Any]]:
        """The grid of :class:`optuna.samplers.GridSampler` (``points`` values per range)."""
        if points < 2:
            raise ConfigError(f"tuning.grid_points must be >= 2, got {points}")
        return {p.name: p.grid(points) for p in self.params}

    def grid_size(self, points: int) -> int:
        return int(math.prod(len(v) for v in self.grid(points).values()))

    def overrides(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Map sampled values onto ``{'model': {...}, 'training': {...}, 'augment': {...}}``."""
        out: dict[str, dict[str, Any]] = {"model": {}, "training": {}, "augment": {}}
        for spec in self.params:
            if spec.name not in params:
                continue
            value = _plain(params[spec.name])
            section, _, key = spec.target.partition(".")
            if section == "derived" and key == "group_width":
                out["model"]["group_channels"] = [max(1, round(value * r)) for r in self.group_ratios]
            elif section == "derived" and key == "augment_strength":
                s = float(value)
                base = AugmentConfig()
                out["augment"]["noise_max_factor"] = 1.0 + s * (base.noise_max_factor - 1.0)
                for name in STRENGTH_FIELDS[1:]:
                    out["augment"][name] = s * float(getattr(base, name))
            else:
                out[section][key] = value
        return out

    def apply(
        self, params: Mapping[str, Any], model: ModelConfig, train: TrainConfig
    ) -> tuple[ModelConfig, TrainConfig]:
        """Base configurations updated with the sampled ``params`` (validated by the training library)."""
        ov = self.overrides(params)
        m = ModelConfig.from_dict({**model.to_dict(), **ov["model"]}) if ov["model"] else model
        t_dict = train.to_dict()
        t_dict.update(ov["training"])
        if ov["augment"]:
            t_dict["augment"] = {**train.augment.to_dict(), **ov["augment"]}
        return m, TrainConfig.from_dict(t_dict)

    def overlay(self, params: Mapping[str, Any], model_name: str) -> dict[str, dict[str, Any]]:
        """A config overlay (``[model]``, ``[training]``, ``[training.augment]``) for ``specabund train``."""
        ov = self.overrides(params)
        overlay: dict[str, dict[str, Any]] = {"model": {"name": model_name, **ov["model"]}}
        training: dict[str, Any] = dict(ov["training"])
        if ov["augment"]:
            training["augment"] = dict(ov["augment"])
        if training:
            overlay["training"] = training
        return overlay

    def check(self, model: ModelConfig, train: TrainConfig) -> None:
        """Validate every choice and both ends of every range against the training library.

        Raises
        ------
        ConfigError
            Naming the parameter and the value the library rejects (e.g. an even ``kernel_size``).
        """
        for spec in self.params:
            values = list(spec.choices or ()) if spec.kind == "categorical" else [spec.low, spec.high]
            for v in values:
                try:
                    self.apply({spec.name: v}, model, train)
                except (ConfigError, TypeError, ValueError) as exc:
                    raise ConfigError(f"tuning_space.{spec.name} = {v!r} is not usable: {exc}") from exc


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def model_config_from_sections(cfg: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a loaded configuration's ``[model]`` section.

    Built by the configuration schema (:meth:`specabund.config.Settings.model_config`), like
    ``specabund train`` does: keys that are not ``ModelConfig`` fields raise :class:`ConfigError`.
    """
    return parse_settings({"model": dict(cfg.get("model", {}))}).model_config()


def train_config_from_sections(cfg: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a loaded configuration's ``[training]`` section.

    Built by the configuration schema (:meth:`specabund.config.Settings.train_config`), like
    ``specabund train`` does: an unknown key raises :class:`ConfigError` naming it; ``ensemble`` (the
    number of members) is not a ``TrainConfig`` field and is left out; ``augment`` may be a sub-table of
    ``AugmentConfig`` fields. ``overrides`` replace fields (``device``: the resolved device).
    """
    device = overrides.pop("device", None)
    settings = parse_settings({"training": dict(cfg.get("training", {}))})
    return settings.train_config(device, **overrides)


def with_fields(train: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``train`` with ``changes`` (re-validated)."""
    data = train.to_dict()
    data.update(changes)
    return TrainConfig.from_dict(data)
