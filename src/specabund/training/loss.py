"""Masked losses: missing labels (NaN) contribute exactly nothing, neither value nor gradient."""

from __future__ import annotations

import torch


def _masked(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.isfinite(target)
    return mask, torch.where(mask, target, torch.zeros_like(target))


def gaussian_nll(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    logvar_min: float = -10.0,
    logvar_max: float = 6.0,
) -> torch.Tensor:
    """Heteroscedastic Gaussian negative log-likelihood averaged over the present labels.

    ``0.5 * (logvar + (target - mean)**2 * exp(-logvar))`` per (spectrum, label), without the constant
    ``0.5 log 2 pi``. Entries whose target is NaN are removed with ``torch.where`` (not a multiplication,
    which would turn NaN into NaN gradients), so their value cannot influence the loss or the gradient.

    Parameters
    ----------
    mean, logvar, target : torch.Tensor
        ``(batch, labels)``; ``target`` may hold NaN for missing labels.
    logvar_min, logvar_max : float
        Clamp of the log-variance.

    Returns
    -------
    torch.Tensor
        Scalar; zero (with zero gradient) when no label is present.
    """
    mask, t = _masked(target)
    lv = logvar.float().clamp(logvar_min, logvar_max)
    per = 0.5 * (lv + (t - mean.float()) ** 2 * torch.exp(-lv))
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp(min=1)


def masked_mse(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the present (finite) targets; used as an optional warm-up loss."""
    mask, t = _masked(target)
    per = torch.where(mask, (t - mean.float()) ** 2, torch.zeros_like(t))
    return per.sum() / mask.sum().clamp(min=1)
