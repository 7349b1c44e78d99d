"""Tensors, label scaling, network input and physically motivated augmentation.

Network input (:func:`prepare_input`)
    channel 0 is ``flux - 1`` (continuum at zero), with pixels that carry no data (``ivar <= 0`` or
    non-finite flux) set to the continuum and the rest clipped to ``[FLUX_MIN, FLUX_MAX] - 1`` so that
    single cosmic rays or dead pixels cannot dominate a batch. With two channels, channel 1 is the flux
    uncertainty ``1 / sqrt(ivar)`` clipped to ``SIGMA_CAP`` (pixels without data take the cap).

Augmentation (:class:`Augmenter`), applied to ``(flux, ivar)`` before :func:`prepare_input`, each with
its own probability per spectrum and drawn from a ``torch.Generator``:

``noise``
    Degrade the SNR by a factor ``f ~ U(1, noise_max_factor)``: add Gaussian noise of standard
    deviation ``sigma * sqrt(f**2 - 1)`` (``sigma = ivar**-0.5``) and divide ``ivar`` by ``f**2``,
    so flux and inverse variance stay consistent.
``rv``
    Doppler shift by ``v ~ U(-rv_max_kms, rv_max_kms)``, the residual radial-velocity error after the
    rest-frame shift; on a log-uniform grid this is a constant sub-pixel shift
    ``log10(1 + v/c) / dlog`` applied by linear interpolation (edges repeat the end pixel; a pixel
    next to a pixel without data gets no data).
``continuum``
    Multiply by ``s * (1 + t * x)`` with ``s ~ N(1, continuum_scale)``, ``t ~ N(0, continuum_tilt)`` and
    ``x`` the wavelength mapped to ``[-1, 1]``: the residual error of continuum normalisation. ``ivar``
    is divided by the square of the same factor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataMismatchError
from ..utils import reject_unknown_keys

FLUX_MIN = -1.0
FLUX_MAX = 3.0
SIGMA_CAP = 1.0
C_KMS = 299792.458


def prepare_input(flux: torch.Tensor, ivar: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Build the ``(batch, in_channels, pixels)`` network input from flux and inverse variance.

    Parameters
    ----------
    flux, ivar : torch.Tensor
        ``(batch, pixels)`` normalised flux and its inverse variance.
    in_channels : int
        1 (flux only) or 2 (flux and clipped sigma).
    """
    good = torch.isfinite(flux) & torch.isfinite(ivar) & (ivar > 0)
    f = torch.where(good, flux, torch.ones_like(flux)).clamp(FLUX_MIN, FLUX_MAX) - 1.0
    if in_channels == 1:
        return f.unsqueeze(1)
    safe = torch.where(good, ivar, torch.ones_like(ivar))
    sigma = torch.where(good, safe.rsqrt(), torch.full_like(ivar, SIGMA_CAP)).clamp(max=SIGMA_CAP)
    return torch.stack([f, sigma], dim=1)


@dataclass
class LabelScaler:
    """Per-label mean and standard deviation (NaN-aware) used to standardise the targets."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, y: np.ndarray, labels: list[str]) -> LabelScaler:
        """Statistics of ``y`` (N, L) ignoring NaN; a label without values raises, zero spread gives 1."""
        y = np.asarray(y, dtype=np.float64)
        counts = np.isfinite(y).sum(axis=0)
        empty = [lab for lab, c in zip(labels, counts, strict=True) if c == 0]
        if empty:
            raise DataMismatchError(f"training data have no values for labels {empty}")
        mean = np.nanmean(y, axis=0)
        std = np.nanstd(y, axis=0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        return cls(mean=mean.astype(np.float64), std=std.astype(np.float64))

    def transform(self, y: np.ndarray) -> np.ndarray:
        return ((np.asarray(y, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.std + self.mean


def select_labels(y: np.ndarray, elements: list[str], labels: list[str]) -> np.ndarray:
    """Columns ``labels`` of ``y`` (N, L_all) in the requested order; unknown labels raise."""
    missing = [lab for lab in labels if lab not in elements]
    if missing:
        raise DataMismatchError(f"labels {missing} not in dataset labels {elements}")
    idx = [elements.index(lab) for lab in labels]
    return np.asarray(y, dtype=np.float32)[:, idx]


def log_step(wavelength: np.ndarray) -> float:
    """Median step of ``log10(wavelength)`` (the pixel size in dex of a log-uniform grid)."""
    lw = np.log10(np.asarray(wavelength, dtype=np.float64))
    return float(np.median(np.diff(lw)))


@dataclass
class AugmentConfig:
    """Probabilities and strengths of the augmentations (see the module docstring).

    A probability of 0 switches an augmentation off; ``enabled=False`` switches all off. Noise and
    radial-velocity augmentation are off by default: in the accuracy ablation they cost accuracy on
    pipeline-preprocessed spectra (the network's error did not fall with SNR); the continuum tilt stays.
    """

    enabled: bool = True
    noise_prob: float = 0.0
    noise_max_factor: float = 2.0
    rv_prob: float = 0.0
    rv_max_kms: float = 10.0
    continuum_prob: float = 0.5
    continuum_scale: float = 0.01
    continuum_tilt: float = 0.01
    #: abundance-swap augmentation (:mod:`specabund.training.swap`): probability per star and abundance
    swap_prob: float = 0.0

    def __post_init__(self) -> None:
        for key in ("noise_prob", "rv_prob", "continuum_prob", "swap_prob"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"augmentation {key} must lie in [0, 1], got {v}")
        if self.noise_max_factor < 1.0:
            raise ConfigError(f"augmentation noise_max_factor must be >= 1, got {self.noise_max_factor}")
        for key in ("rv_max_kms", "continuum_scale", "continuum_tilt"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augmentation {key} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        reject_unknown_keys(cls, data, "augmentation keys")
        return cls(**data)


class Augmenter:
    """Apply :class:`AugmentConfig` augmentations to batches of ``(flux, ivar)``.

    Parameters
    ----------
    config : AugmentConfig
        What to apply.
    wavelength : numpy.ndarray
        The common wavelength grid (Angstrom); used for the pixel size in dex and the tilt coordinate.
    """

    def __init__(self, config: AugmentConfig, wavelength: np.ndarray) -> None:
        self.config = config
        wl = np.asarray(wavelength, dtype=np.float64)
        self.dlog = log_step(wl)
        x = (wl - wl.min()) / max(wl.max() - wl.min(), 1e-12)
        self._x = torch.as_tensor(2.0 * x - 1.0, dtype=torch.float32)

    def __call__(
        self, flux: torch.Tensor, ivar: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented copies of ``flux`` and ``ivar`` (``(batch, pixels)``, CPU or GPU).

        Random numbers are drawn on the CPU from ``generator`` (same sequence on every device).
        """
        cfg = self.config
        if not cfg.enabled:
            return flux, ivar
        n, p = flux.shape
        dev = flux.device
        g = generator

        def draw_mask(prob: float) -> torch.Tensor:
            return (torch.rand(n, generator=g) < prob).to(dev)

        if cfg.rv_prob > 0 and cfg.rv_max_kms > 0:
            use = draw_mask(cfg.rv_prob)
            v = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * cfg.rv_max_kms
            shift = (torch.log10(1 + v / C_KMS) / self.dlog).to(dev)
            shift = torch.where(use, shift, torch.zeros_like(shift))
            flux, ivar = _shift(flux, ivar, shift)
        if cfg.continuum_prob > 0 and (cfg.continuum_scale > 0 or cfg.continuum_tilt > 0):
            use = draw_mask(cfg.continuum_prob)
            s = 1 + torch.randn(n, generator=g) * cfg.continuum_scale
            t = torch.randn(n, generator=g) * cfg.continuum_tilt
            fac = s[:, None] * (1 + t[:, None] * self._x[None, :])
            fac = fac.to(dev).clamp(min=0.5)
            fac = torch.where(use[:, None], fac, torch.ones_like(fac))
            flux = flux * fac
            ivar = ivar / fac**2
        if cfg.noise_prob > 0 and cfg.noise_max_factor > 1:
            use = draw_mask(cfg.noise_prob)
            f = 1 + torch.rand(n, generator=g) * (cfg.noise_max_factor - 1)
            eps = torch.randn(n, p, generator=g).to(dev)
            f = torch.where(use, f.to(dev), torch.ones(n, device=dev))
            good = ivar > 0
            sigma = torch.where(good, ivar.clamp(min=1e-30).rsqrt(), torch.zeros_like(ivar))
            flux = flux + sigma * torch.sqrt(f**2 - 1)[:, None] * eps
            ivar = ivar / (f**2)[:, None]
        return flux, ivar


def _shift(flux: torch.Tensor, ivar: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each row by ``shift`` pixels (positive = redward) with linear interpolation."""
    p = flux.shape[1]
    pos = torch.arange(p, device=flux.device, dtype=torch.float64)[None, :] - shift[:, None].double()
    pos = pos.clamp(0, p - 1)
    i0 = pos.floor().long().clamp(0, p - 1)
    i1 = (i0 + 1).clamp(max=p - 1)
    w = (pos - i0).to(flux.dtype)
    f0, f1 = flux.gather(1, i0), flux.gather(1, i1)
    v0, v1 = ivar.gather(1, i0), ivar.gather(1, i1)
    out_f = f0 * (1 - w) + f1 * w
    # interpolate the variance; a pixel touching a pixel without data has no data
    bad = ((v0 <= 0) & (w < 1)) | ((v1 <= 0) & (w > 0))
    var = (1 - w) ** 2 / v0.clamp(min=1e-30) + w**2 / v1.clamp(min=1e-30)
    out_v = torch.where(bad, torch.zeros_like(ivar), 1.0 / var)
    keep = (shift == 0)[:, None]
    return torch.where(keep, flux, out_f), torch.where(keep, ivar, out_v)
