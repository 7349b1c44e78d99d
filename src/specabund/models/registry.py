"""Model configuration and the registry of named network architectures.

A model is described by a :class:`ModelConfig`; its ``name`` selects a factory registered with
:func:`register_model`. Each registered name also carries preset sizes, so ``default_config('rescnn_small')``
gives a ready configuration that ``build_model`` turns into a network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..utils import reject_unknown_keys

ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu", "elu")
DOWNSAMPLING = ("stride", "maxpool", "avgpool")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a residual 1-D CNN.

    Parameters
    ----------
    name : str
        Registered architecture name (see :func:`list_models`).
    in_channels : int
        1 (normalised flux) or 2 (flux and its clipped uncertainty, see ``training.data.prepare_input``).
    stem_channels : int
        Channels of the stem convolution.
    stem_kernel_size : int
        Kernel of the stem convolution (pixels).
    stem_stride : int
        Stride of the stem convolution (first downsampling, in pixels).
    group_channels : tuple of int
        Channels of the three groups of residual blocks.
    blocks_per_group : int
        Residual blocks per group; the first block of each group halves the length.
    kernel_size : int
        Kernel of the convolutions inside the residual blocks (odd).
    downsample : str
        How groups halve the length: ``'stride'`` (strided convolution), ``'maxpool'`` or ``'avgpool'``.
    dropout : float
        Dropout probability inside the residual blocks. 0 by default: in the accuracy ablation
        (``benchmarks/ablation.py``) dropout in every block cost accuracy, and with dropout only in the head
        MC-Dropout runs the trunk once (``head_dropout`` carries the model uncertainty).
    pool_bins : int
        Output length of the adaptive average pooling before the head. ``1`` is a pure global average
        pooling; a few bins keep coarse wavelength information (which line is where), which a purely
        local feature map cannot otherwise recover. 32 by default (about 110 input pixels per bin).
    head_hidden : int
        Width of the hidden layer of the fully connected head.
    head_dropout : float
        Dropout before the output layer of the head.
    activation : str
        One of ``relu``, ``gelu``, ``silu``, ``leaky_relu``, ``elu``.
    logvar_min, logvar_max : float
        Clamp of the predicted log-variance (in standardised label units).
    """

    name: str = "rescnn"
    in_channels: int = 1
    stem_channels: int = 32
    stem_kernel_size: int = 9
    stem_stride: int = 2
    group_channels: tuple[int, int, int] = (32, 64, 96)
    blocks_per_group: int = 1
    kernel_size: int = 5
    downsample: str = "stride"
    dropout: float = 0.0
    pool_bins: int = 32
    head_hidden: int = 128
    head_dropout: float = 0.1
    activation: str = "gelu"
    logvar_min: float = -10.0
    logvar_max: float = 6.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_channels", tuple(int(c) for c in self.group_channels))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~specabund.errors.ConfigError` on an impossible configuration."""
        if self.in_channels not in (1, 2):
            raise ConfigError(f"model in_channels must be 1 or 2, got {self.in_channels}")
        if len(self.group_channels) != 3 or min(self.group_channels) < 1:
            raise ConfigError(f"model group_channels must be three positive ints, got {self.group_channels}")
        for key in ("stem_channels", "stem_kernel_size", "stem_stride", "blocks_per_group", "kernel_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model {key} must be >= 1, got {getattr(self, key)}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"model kernel_size must be odd, got {self.kernel_size}")
        if self.pool_bins < 1 or self.head_hidden < 1:
            raise ConfigError("model pool_bins and head_hidden must be >= 1")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.head_dropout < 1.0):
            raise ConfigError("model dropout values must lie in [0, 1)")
        if self.activation not in ACTIVATIONS:
            allowed = ", ".join(ACTIVATIONS)
            raise ConfigError(f"model activation = {self.activation!r}; allowed values: {allowed}")
        if self.downsample not in DOWNSAMPLING:
            allowed = ", ".join(DOWNSAMPLING)
            raise ConfigError(f"model downsample = {self.downsample!r}; allowed values: {allowed}")
        if not self.logvar_min < self.logvar_max:
            raise ConfigError("model logvar_min must be below logvar_max")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        d = asdict(self)
        d["group_channels"] = list(self.group_channels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dictionary; unknown keys raise :class:`ConfigError`.

        Keys that are absent take the preset of ``data['name']`` (or the class defaults).
        """
        reject_unknown_keys(cls, data, "model config keys")
        name = data.get("name", cls.name)
        base = default_config(name) if name in _REGISTRY else cls(name=name)
        return replace(base, **data)


ModelFactory = Callable[[ModelConfig, int, int], nn.Module]

_REGISTRY: dict[str, tuple[ModelFactory, dict[str, Any]]] = {}


def register_model(name: str, **preset: Any) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory ``f(config, n_pixels, n_labels) -> nn.Module`` under ``name``.

    Parameters
    ----------
    name : str
        Architecture name, stored as ``ModelConfig.name``.
    **preset
        Config values that differ from the :class:`ModelConfig` defaults for this name.
    """

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ConfigError(f"model {name!r} is already registered")
        _REGISTRY[name] = (factory, dict(preset))
        return factory

    return deco


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_REGISTRY)


def default_config(name: str = "rescnn", **overrides: Any) -> ModelConfig:
    """The preset configuration of a registered architecture, with optional overrides."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {list_models()}")
    values = {**_REGISTRY[name][1], **overrides, "name": name}
    return ModelConfig(**values)


def build_model(config: ModelConfig, n_pixels: int, n_labels: int) -> nn.Module:
    """Instantiate the network ``config.name`` for spectra of ``n_pixels`` pixels and ``n_labels`` labels."""
    if config.name not in _REGISTRY:
        raise ConfigError(f"unknown model {config.name!r}; registered: {list_models()}")
    if n_pixels < 8 or n_labels < 1:
        raise ConfigError(f"cannot build a model for {n_pixels} pixels and {n_labels} labels")
    factory = _REGISTRY[config.name][0]
    return factory(config, int(n_pixels), int(n_labels))
