"""Neural network architectures and their registry."""

from __future__ import annotations

from .registry import ModelConfig, build_model, default_config, list_models, register_model
from .rescnn import ResidualBlock, SpectralResCNN

__all__ = [
    "ModelConfig",
    "ResidualBlock",
    "SpectralResCNN",
    "build_model",
    "default_config",
    "list_models",
    "register_model",
]
