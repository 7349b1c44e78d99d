"""Configuration: packaged defaults, overlaid by a user TOML file, overlaid by CLI flags.

The defaults live in ``configs/default.toml`` (shipped inside the package as ``specabund/data/default.toml``).
A user file may set any subset of the keys; unknown sections or keys, and values of the wrong type, are
errors that name the key and what is allowed.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError
from .utils import atomic_write_text

#: Keys whose values must come from a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "training.scheduler": ("onecycle", "cosine", "plateau", "none"),
    "training.loss": ("mse", "nll", "beta_nll"),
    "training.device": ("auto", "cpu", "cuda"),
    "tuning.method": ("tpe", "grid", "random"),
    "data.flag_policy": ("mask", "keep"),
}

#: Keys whose values must be positive numbers.
POSITIVE: tuple[str, ...] = (
    "preprocess.log_step",
    "preprocess.chunk_size",
    "preprocess.n_workers",
    "preprocess.batch_size",
    "data.max_abs_rv_kms",
    "training.batch_size",
    "training.learning_rate",
    "training.epochs",
    "training.ensemble",
    "tuning.n_trials",
    "tuning.batch_size_hyperopt",
    "tuning.batches_per_round",
    "tuning.trials_per_round",
    "tuning.epochs_per_trial",
    "tuning.grid_points",
    "analysis.analysis_batch_size",
)

# Sections whose keys are free-form (validated by the stage that uses them, e.g. model options).
OPEN_SECTIONS: tuple[str, ...] = ("preprocess", "model", "training", "tuning_space")


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


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any], source: str = "overlay") -> dict[str, Any]:
    """Return ``base`` updated by ``overlay``, checking sections, keys and types against ``base``."""
    out = copy.deepcopy(dict(base))
    for section, values in overlay.items():
        if section not in out:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed sections: {', '.join(sorted(out))}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        for key, value in values.items():
            if value is None:
                continue
            dotted = f"{section}.{key}"
            if key not in out[section]:
                if section in OPEN_SECTIONS:
                    out[section][key] = value
                    continue
                raise ConfigError(
                    f"{source}: unknown key {dotted}; allowed keys in [{section}]: "
                    f"{', '.join(sorted(out[section]))}"
                )
            default = out[section][key]
            if not _type_ok(default, value):
                raise ConfigError(
                    f"{source}: {dotted} = {value!r} has type {type(value).__name__}, "
                    f"expected {type(default).__name__}"
                )
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            out[section][key] = value
    return out


def validate(cfg: Mapping[str, Any]) -> None:
    """Check choices and ranges; raise :class:`ConfigError` naming the key and the allowed values."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = cfg.get(section, {}).get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{dotted} = {value!r}; allowed values: {', '.join(allowed)}")
    for dotted in POSITIVE:
        section, key = dotted.split(".")
        value = cfg.get(section, {}).get(key)
        if value is not None and not value > 0:
            raise ConfigError(f"{dotted} = {value!r}; must be > 0")
    p = cfg.get("preprocess", {})
    if p and not 3000 <= p["wave_min"] < p["wave_max"] <= 10000:
        raise ConfigError(
            f"preprocess.wave_min/wave_max = {p['wave_min']}/{p['wave_max']}; "
            "need 3000 <= wave_min < wave_max <= 10000"
        )
    fr = cfg.get("data", {}).get("split_fractions")
    if fr is not None and (len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6):
        raise ConfigError(f"data.split_fractions = {fr!r}; need three non-negative numbers summing to 1")


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
    """Defaults, overlaid by ``user_file`` (TOML), overlaid by ``overrides`` (``'section.key'`` -> value)."""
    cfg = default_config()
    if user_file is not None:
        cfg = merge(cfg, read_toml(user_file), source=str(user_file))
    if overrides:
        cfg = merge(cfg, dotted_to_nested(overrides), source="command line")
    validate(cfg)
    return cfg


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
