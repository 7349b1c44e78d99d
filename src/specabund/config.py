"""Configuration: packaged defaults, overlaid by a user TOML file, overlaid by CLI flags.

The typed schema below is the single source of truth for the keys, types, ranges and defaults of every
section of ``configs/default.toml`` (shipped inside the package as ``specabund/data/default.toml``; a test
checks that the file agrees with the classes). Each section is described by one or more dataclasses:

=================  ===============================================================================
``[paths]``        :class:`PathsSection`
``[data]``         :class:`DataSection`
``[preprocess]``   :class:`PipelineSection` plus :class:`~specabund.preprocess.PreprocessOptions`
``[model]``        :class:`~specabund.models.ModelConfig` (absent keys: the preset of ``name``)
``[training]``     :class:`TrainingSection` plus :class:`~specabund.training.TrainConfig`
                   (``[training.augment]``: :class:`~specabund.training.AugmentConfig`)
``[evaluation]``   :class:`EvaluationSection`
``[tuning]``       :class:`TuningSection`
``[tuning_space]`` one table per hyperparameter (see :mod:`specabund.tuning.space`)
``[analysis]``     :class:`AnalysisSection`
``[baseline]``     :class:`BaselineSection`
=================  ===============================================================================

Every command reads its configuration through :func:`load_config` (a nested dict) or :func:`load_settings`
(the typed :class:`Settings`); both validate the whole configuration the same way: an unknown section or
key, a value of the wrong type, outside its range or not among its choices is a
:class:`~specabund.errors.ConfigError` naming the section and key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from .errors import ConfigError
from .utils import atomic_write_text
from .workspace import DEFAULT_PATHS

if TYPE_CHECKING:  # pragma: no cover
    from .baselines.registry import CannonSettings
    from .models import ModelConfig
    from .preprocess import PreprocessOptions
    from .training import TrainConfig


def limits(
    *,
    choices: tuple[Any, ...] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> dict[str, Any]:
    """Field metadata of a configuration key: the allowed ``choices``, or its range (``> gt``, ``>= ge``,
    ``<= le``); checked by :func:`check_section`."""
    return {"choices": choices, "gt": gt, "ge": ge, "le": le}


@dataclass(frozen=True)
class PathsSection:
    """``[paths]``: the runtime folders under ``--workdir`` (see :class:`~specabund.workspace.Workspace`)."""

    fits_dir: str = DEFAULT_PATHS["fits_dir"]
    processed_dir: str = DEFAULT_PATHS["processed_dir"]
    models_dir: str = DEFAULT_PATHS["models_dir"]
    results_dir: str = DEFAULT_PATHS["results_dir"]
    logs_dir: str = DEFAULT_PATHS["logs_dir"]
    plots_dir: str = DEFAULT_PATHS["plots_dir"]


def _default_label_ranges() -> dict[str, list[float]]:
    return {
        "TEFF": [2500.0, 50000.0],
        "LOGG": [-1.0, 6.0],
        "FE_H": [-5.0, 1.5],
        "M_H": [-5.0, 1.5],
        "*_FE": [-3.0, 4.0],
        "*_M": [-3.0, 4.0],
        "*_H": [-5.0, 2.0],
    }


@dataclass(frozen=True)
class DataSection:
    """``[data]``: labels, catalogue rules and the reference split (see ``configs/default.toml``)."""

    elements: list[str] = field(default_factory=list)
    include_stellar_parameters: bool = True
    sentinels: list[float] = field(default_factory=lambda: [-9999.0, -999.0])
    flag_policy: str = field(default="mask", metadata=limits(choices=("mask", "keep")))
    label_ranges: dict[str, list[float]] = field(default_factory=_default_label_ranges)
    max_abs_rv_kms: float = field(default=1000.0, metadata=limits(gt=0))
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    seed: int = 42


@dataclass(frozen=True)
class PipelineSection:
    """The ``[preprocess]`` keys that drive the pipeline; the others are ``PreprocessOptions`` fields."""

    normalize: bool = True
    chunk_size: int = field(default=1000, metadata=limits(gt=0))
    n_workers: int = field(default=1, metadata=limits(gt=0))
    batch_size: int = field(default=32, metadata=limits(gt=0))
    n_plot_examples: int = field(default=4, metadata=limits(ge=0))


@dataclass(frozen=True)
class TrainingSection:
    """The ``[training]`` keys that are not ``TrainConfig`` fields, or differ from them in the file.

    ``device`` may be ``'auto'`` here (the command resolves it); ``ensemble`` is the number of members.
    """

    device: str = field(default="auto", metadata=limits(choices=("auto", "cpu", "cuda")))
    ensemble: int = field(default=1, metadata=limits(gt=0))


@dataclass(frozen=True)
class EvaluationSection:
    """``[evaluation]``: SNR bin edges and the dwarf/giant logg split of ``specabund test``."""

    snr_bins: list[float] = field(default_factory=lambda: [0.0, 20.0, 50.0, 100.0, math.inf])
    logg_split: float = 3.8


@dataclass(frozen=True)
class TuningSection:
    """``[tuning]``: the settings of ``specabund tune`` (see :class:`~specabund.tuning.TuneOptions`)."""

    n_trials: int = field(default=50, metadata=limits(gt=0))
    method: str = field(default="tpe", metadata=limits(choices=("tpe", "grid", "random")))
    batch_size_hyperopt: int = field(default=1000, metadata=limits(ge=2))
    batches_per_round: int = field(default=2, metadata=limits(gt=0))
    trials_per_round: int = field(default=10, metadata=limits(gt=0))
    epochs_per_trial: int = field(default=20, metadata=limits(gt=0))
    timeout: float = field(default=0.0, metadata=limits(ge=0))
    pruner: str = field(
        default="median", metadata=limits(choices=("median", "percentile", "hyperband", "none"))
    )
    pruner_startup_trials: int = field(default=5, metadata=limits(ge=0))
    pruner_warmup_epochs: int = field(default=3, metadata=limits(ge=0))
    grid_points: int = field(default=3, metadata=limits(ge=2))
    group_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    storage: str = ""
    study_name: str = "specabund"
    seed: int = 42


@dataclass(frozen=True)
class AnalysisSection:
    """``[analysis]``: ``specabund analyze`` (the importance keys are ``ImportanceSettings`` fields)."""

    analysis_batch_size: int = field(default=32, metadata=limits(gt=0))
    top_n_regions: int = field(default=10, metadata=limits(gt=0))
    max_spectra: int = field(default=1000, metadata=limits(ge=0))
    ig_steps: int = field(default=64, metadata=limits(gt=0))
    ig_internal_batch: int = field(default=512, metadata=limits(gt=0))
    occlusion_window: int = field(default=9, metadata=limits(gt=0))
    occlusion_stride: int = field(default=3, metadata=limits(gt=0))
    occlusion_per_batch: int = field(default=8, metadata=limits(ge=0))
    smooth_pixels: int = field(default=5, metadata=limits(gt=0))
    max_region_half_width: float = field(default=15.0, metadata=limits(gt=0))
    own_line_half_width: float = field(default=3.0, metadata=limits(gt=0))


@dataclass(frozen=True)
class BaselineSection:
    """``[baseline]``: ``specabund baseline`` and the Cannon (``cannon_*``, see ``CannonSettings``)."""

    batch_size: int = field(default=0, metadata=limits(ge=0))
    batches_per_round: int = field(default=2, metadata=limits(gt=0))
    n_threads: int = field(default=0, metadata=limits(ge=0))
    device: str = field(default="cpu", metadata=limits(choices=("cpu", "cuda")))
    cannon_order: int = field(default=3, metadata=limits(ge=1, le=4))
    cannon_regions: int = field(default=0, metadata=limits(ge=0))
    cannon_overlap: int = field(default=2, metadata=limits(ge=1))
    cannon_censor_half_width: float = 4.0
    cannon_prior: bool = True
    cannon_continuum_pixels: int = field(default=40, metadata=limits(ge=0))


#: Sections described entirely by one dataclass of this module.
PLAIN_SECTIONS: dict[str, type] = {
    "paths": PathsSection,
    "data": DataSection,
    "evaluation": EvaluationSection,
    "tuning": TuningSection,
    "analysis": AnalysisSection,
    "baseline": BaselineSection,
}
#: All sections, in the order of ``configs/default.toml``.
SECTIONS: tuple[str, ...] = (
    "paths",
    "data",
    "preprocess",
    "model",
    "training",
    "evaluation",
    "tuning",
    "tuning_space",
    "analysis",
    "baseline",
)
#: Keys of a ``[tuning_space]`` entry.
SPACE_KEYS: tuple[str, ...] = ("low", "high", "log", "step", "choices", "target")


def _leaf_classes(section: str) -> tuple[type, ...]:
    """The dataclasses whose fields are the keys of ``section`` (the first one wins for a shared key)."""
    if section in PLAIN_SECTIONS:
        return (PLAIN_SECTIONS[section],)
    if section == "preprocess":
        from .preprocess.options import PreprocessOptions

        return (PipelineSection, PreprocessOptions)
    if section == "model":
        from .models import ModelConfig

        return (ModelConfig,)
    if section == "training":
        from .training import TrainConfig

        return (TrainingSection, TrainConfig)
    return ()


def _hints(cls: type) -> dict[str, Any]:
    import sys

    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def section_fields(section: str) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    """``key -> (type, dataclass field)`` of every key allowed in ``section`` (empty: free-form)."""
    out: dict[str, tuple[Any, dataclasses.Field[Any]]] = {}
    for cls in _leaf_classes(section):
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (hints[f.name], f))
    return out


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _toml_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _toml_value(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple):
        return [_toml_value(v) for v in value]
    if isinstance(value, list):
        return [_toml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items()}
    return value


def section_defaults(section: str) -> dict[str, Any]:
    """The defaults of every key of ``section`` from the classes (TOML-ready; ``None`` left out)."""
    out = {}
    for name, (_, f) in section_fields(section).items():
        value = _field_default(f)
        if value is not dataclasses.MISSING and value is not None:
            out[name] = _toml_value(value)
    return out


# --------------------------------------------------------------------------------------- validation


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (ints widened to float); raise naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(where, value, a)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where} = {value!r} has type {type(value).__name__}, expected {expected}")

    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("bool")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("int")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("float")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("str")
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("list")
        if not args:
            return list(value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where} = {value!r}; expected {len(args)} values")
            return [
                _check_type(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        return [_check_type(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise bad("table")
        if len(args) == 2:
            return {str(k): _check_type(f"{where}.{k}", v, args[1]) for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise bad("table")
        return _check_table(where, value, section_fields_of(hint))
    return value


def section_fields_of(cls: type) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    """``key -> (type, field)`` of the dataclass ``cls`` (a sub-table such as ``[training.augment]``)."""
    hints = _hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _check_range(where: str, value: Any, f: dataclasses.Field[Any]) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r}; allowed values: {', '.join(map(str, choices))}")
    if meta.get("gt") is not None and not value > meta["gt"]:
        raise ConfigError(f"{where} = {value!r}; must be > {meta['gt']:g}")
    if meta.get("ge") is not None and not value >= meta["ge"]:
        raise ConfigError(f"{where} = {value!r}; must be >= {meta['ge']:g}")
    if meta.get("le") is not None and not value <= meta["le"]:
        raise ConfigError(f"{where} = {value!r}; must be <= {meta['le']:g}")


def _check_table(
    where: str, table: Mapping[str, Any], allowed: Mapping[str, tuple[Any, dataclasses.Field[Any]]]
) -> dict[str, Any]:
    out = {}
    for k, value in table.items():
        dotted = f"{where}.{k}"
        if k not in allowed:
            raise ConfigError(
                f"unknown key {dotted}; allowed keys in [{where}]: {', '.join(sorted(allowed))}"
            )
        hint, f = allowed[k]
        value = _check_type(dotted, value, hint)
        _check_range(dotted, value, f)
        out[k] = value
    return out


def _check_space(space: Any) -> None:
    if not isinstance(space, Mapping):
        raise ConfigError("[tuning_space] must be a table of hyperparameter = {...}")
    for name, spec in space.items():
        if spec is False:
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"tuning_space.{name} must be a table such as {{low = 1e-4, high = 1e-2, log = true}} "
                f"or {{choices = [32, 64]}}, got {spec!r}"
            )
        unknown = sorted(set(spec) - set(SPACE_KEYS))
        if unknown:
            raise ConfigError(
                f"tuning_space.{name}: unknown keys {unknown} (allowed: {', '.join(SPACE_KEYS)})"
            )


def check_section(section: str, values: Mapping[str, Any], source: str = "configuration") -> dict[str, Any]:
    """``values`` of ``section`` checked key by key (unknown key, type, choices, range).

    Raises
    ------
    ConfigError
        Naming ``source``, the section and the key.
    """
    if section == "tuning_space":
        _check_space(values)
        return dict(values)
    try:
        return _check_table(section, values, section_fields(section))
    except ConfigError as exc:
        if source and not str(exc).startswith(source):
            raise ConfigError(f"{source}: {exc}") from None
        raise


# ----------------------------------------------------------------------------------- typed settings


def _plain(section: type, values: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(section)}
    return section(**{k: v for k, v in values.items() if k in names})


def _wrap(section: str, exc: Exception) -> ConfigError:
    text = str(exc)
    return ConfigError(text if text.startswith(f"{section}.") else f"[{section}]: {text}")


@dataclass(frozen=True)
class Settings:
    """A validated configuration: the typed sections, and the objects the library takes built from them.

    Build it with :func:`parse_settings` (or :func:`load_settings`); ``raw`` is the nested dict it came
    from (what ``resolved_config.toml`` holds).
    """

    raw: dict[str, Any]
    paths: PathsSection
    data: DataSection
    pipeline: PipelineSection
    training: TrainingSection
    evaluation: EvaluationSection
    tuning: TuningSection
    analysis: AnalysisSection
    baseline: BaselineSection

    # ---------------------------------------------------------------------------------- builders

    def preprocess_options(self) -> PreprocessOptions:
        """The :class:`~specabund.preprocess.PreprocessOptions` of ``[preprocess]``."""
        from .preprocess.options import PreprocessOptions

        pipe = {f.name for f in dataclasses.fields(PipelineSection)}
        steps = {k: v for k, v in self.raw.get("preprocess", {}).items() if k not in pipe}
        try:
            return PreprocessOptions.from_dict(steps)
        except (ConfigError, TypeError, ValueError) as exc:
            raise _wrap("preprocess", exc) from exc

    def model_config(self) -> ModelConfig:
        """The :class:`~specabund.models.ModelConfig` of ``[model]`` (absent keys: the preset of ``name``)."""
        from .models.registry import default_config as model_preset

        m = dict(self.raw.get("model", {}))
        name = m.pop("name", "rescnn")
        try:
            return model_preset(name, **m)
        except (ConfigError, TypeError, ValueError) as exc:
            raise _wrap("model", exc) from exc

    def train_config(self, device: str | None = None, **overrides: Any) -> TrainConfig:
        """The :class:`~specabund.training.TrainConfig` of ``[training]``.

        Parameters
        ----------
        device : str, optional
            The resolved device (``'cpu'``, ``'cuda'``, ``'cuda:1'``); default ``training.device`` unless it
            is ``'auto'`` (then ``'cpu'``: the library never picks a device by itself).
        **overrides
            Fields replaced (e.g. ``num_threads``, ``epochs``).
        """
        from .training import AugmentConfig, TrainConfig

        own = {f.name for f in dataclasses.fields(TrainingSection)} - {"device"}
        data = {k: v for k, v in self.raw.get("training", {}).items() if k not in own}
        if device is None:
            device = self.training.device if self.training.device != "auto" else "cpu"
        data["device"] = str(device)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            if isinstance(data.get("augment"), Mapping):
                data["augment"] = AugmentConfig.from_dict({**AugmentConfig().to_dict(), **data["augment"]})
            return TrainConfig.from_dict(data)
        except (ConfigError, TypeError, ValueError) as exc:
            raise _wrap("training", exc) from exc

    @property
    def ensemble(self) -> int:
        """Members of an ensemble run (``training.ensemble``)."""
        return self.training.ensemble

    def cannon_settings(self) -> CannonSettings:
        """The Cannon baseline's ``CannonSettings`` (``[baseline] cannon_*``)."""
        from .baselines.registry import CannonSettings

        b = self.baseline
        half_width = float(b.cannon_censor_half_width)
        try:
            return CannonSettings(
                order=b.cannon_order,
                regions=b.cannon_regions,
                overlap=b.cannon_overlap,
                censor_half_width=half_width if half_width >= 0 else None,
                prior=b.cannon_prior,
                continuum_pixels=b.cannon_continuum_pixels,
            )
        except (ConfigError, TypeError, ValueError) as exc:
            raise _wrap("baseline", exc) from exc


def parse_settings(cfg: Mapping[str, Any], source: str = "") -> Settings:
    """Validate a whole configuration (nested dict) and return its :class:`Settings`.

    Missing sections or keys take the defaults of the classes. Raises :class:`ConfigError` naming the
    section and key (prefixed by ``source`` when given).
    """
    raw: dict[str, Any] = {}
    for section, values in cfg.items():
        if section not in SECTIONS:
            where = f"{source}: " if source else ""
            raise ConfigError(
                f"{where}unknown section [{section}]; allowed sections: {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] must be a table of key = value")
        raw[section] = check_section(section, {k: v for k, v in values.items() if v is not None}, source)
    sections = {name: _plain(cls, raw.get(name, {})) for name, cls in PLAIN_SECTIONS.items()}
    pipeline = _plain(PipelineSection, raw.get("preprocess", {}))
    training = _plain(TrainingSection, raw.get("training", {}))
    settings = Settings(raw=raw, pipeline=pipeline, training=training, **sections)
    _cross_checks(settings)
    return settings


def _cross_checks(s: Settings) -> None:
    """Checks that involve more than one key, and the leaf types' own validation."""
    p = s.raw.get("preprocess", {})
    if "wave_min" in p or "wave_max" in p:
        lo, hi = p.get("wave_min", 3900.0), p.get("wave_max", 8900.0)
        if not 3000 <= lo < hi <= 10000:
            raise ConfigError(
                f"preprocess.wave_min/wave_max = {lo}/{hi}; need 3000 <= wave_min < wave_max <= 10000"
            )
    fr = s.data.split_fractions
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(f"data.split_fractions = {fr!r}; need three non-negative numbers summing to 1")
    ratios = s.tuning.group_ratios
    if len(ratios) != 3 or min(ratios) <= 0:
        raise ConfigError(f"tuning.group_ratios must be three positive numbers, got {list(ratios)}")
    if s.tuning.study_name == "" or any(c in s.tuning.study_name for c in "/\\"):
        raise ConfigError(
            f"tuning.study_name = {s.tuning.study_name!r}; must be a non-empty name without slashes"
        )
    from .catalog import CatalogRules

    CatalogRules.from_config(s.raw.get("data", {}))
    s.preprocess_options()
    if "model" in s.raw:
        s.model_config()
    if "training" in s.raw:
        s.train_config()


def default_config() -> dict[str, Any]:
    """The packaged defaults as a fresh nested dict."""
    text = resources.files("specabund").joinpath("data/default.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning parse errors into :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any], source: str = "overlay") -> dict[str, Any]:
    """Return ``base`` updated by ``overlay``, checking sections, keys, types and ranges with the schema."""
    out = copy.deepcopy(dict(base))
    for section, values in overlay.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed sections: {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        given = {k: v for k, v in values.items() if v is not None}
        checked = check_section(section, given, source)
        out.setdefault(section, {}).update(checked)
    return out


def validate(cfg: Mapping[str, Any]) -> None:
    """Check a whole configuration; raise :class:`ConfigError` naming the section, key and what is allowed."""
    parse_settings(cfg)


def dotted_to_nested(overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{'training.epochs': 5}`` -> ``{'training': {'epochs': 5}}`` (``None`` values dropped)."""
    out: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must be of the form section.key")
        out.setdefault(section, {})[key] = value
    return out


def load_config(
    user_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults, overlaid by ``user_file`` (TOML), overlaid by ``overrides`` (``'section.key'`` -> value).

    The result is validated as a whole (:func:`parse_settings`); :func:`load_settings` returns it typed.
    """
    cfg = _overlaid(user_file, overrides)
    validate(cfg)
    return cfg


def _overlaid(user_file: str | Path | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = default_config()
    if user_file is not None:
        cfg = merge(cfg, read_toml(user_file), source=str(user_file))
    if overrides:
        cfg = merge(cfg, dotted_to_nested(overrides), source="command line")
    return cfg


def load_settings(
    user_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Like :func:`load_config`, returning the typed :class:`Settings`."""
    return parse_settings(_overlaid(user_file, overrides))


def _tomlable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _tomlable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_tomlable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return obj


def dumps(cfg: Mapping[str, Any]) -> str:
    """TOML text of a configuration (``None`` values dropped, as TOML has no null)."""
    return tomli_w.dumps(_tomlable(cfg))


def save_config(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write the resolved configuration atomically as TOML."""
    path = Path(path)
    atomic_write_text(path, "# resolved specabund configuration\n" + dumps(cfg))
    return path
