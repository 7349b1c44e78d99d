"""Masked losses: missing labels (NaN) contribute exactly nothing, neither value nor gradient."""

from __future__ import annotations

import torch


def _masked(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.isfinite(target)
    return mask, torch.where(mask, target, torch.zeros_like(target))


def _total_var(lv: torch.Tensor, label_var: torch.Tensor | None) -> torch.Tensor:
    """Predicted variance plus the catalogue's label variance (NaN = unknown = 0)."""
    var = torch.exp(lv)
    if label_var is None:
        return var
    return var + torch.nan_to_num(label_var.float(), nan=0.0).clamp(min=0.0)


def _half_nll(lv: torch.Tensor, sq: torch.Tensor, label_var: torch.Tensor | None) -> torch.Tensor:
    """``0.5 (log sigma^2 + sq / sigma^2)`` with ``sigma^2 = exp(lv) (+ label_var)``."""
    if label_var is None:
        return 0.5 * (lv + sq * torch.exp(-lv))
    var = _total_var(lv, label_var)
    return 0.5 * (torch.log(var) + sq / var)


def gaussian_nll(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    logvar_min: float = -10.0,
    logvar_max: float = 6.0,
    label_var: torch.Tensor | None = None,
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
    label_var : torch.Tensor, optional
        ``(batch, labels)`` variance of the catalogue labels themselves (standardised units; NaN =
        unknown): the likelihood uses ``sigma^2 = sigma_model^2 + sigma_label^2``, so noisy labels neither
        pull the mean as hard nor inflate the predicted uncertainty.

    Returns
    -------
    torch.Tensor
        Scalar; zero (with zero gradient) when no label is present.
    """
    mask, t = _masked(target)
    lv = logvar.float().clamp(logvar_min, logvar_max)
    per = _half_nll(lv, (t - mean.float()) ** 2, label_var)
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp(min=1)


def masked_mse(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the present (finite) targets; used as an optional warm-up loss."""
    mask, t = _masked(target)
    per = torch.where(mask, (t - mean.float()) ** 2, torch.zeros_like(t))
    return per.sum() / mask.sum().clamp(min=1)


def beta_nll(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    beta: float = 0.5,
    logvar_min: float = -10.0,
    logvar_max: float = 6.0,
    label_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """beta-NLL (Seitzer et al. 2022): the Gaussian NLL of each entry weighted by ``sigma**(2 beta)``.

    The weight is detached, so it rescales the gradient without being optimised itself. ``beta = 0`` is the
    plain NLL; ``beta = 1`` gives the mean the gradient of the squared error, which stops the network
    from explaining errors away with a larger predicted variance instead of fitting the mean.
    """
    mask, t = _masked(target)
    lv = logvar.float().clamp(logvar_min, logvar_max)
    per = _half_nll(lv, (t - mean.float()) ** 2, label_var)
    per = per * (_total_var(lv, label_var) ** beta).detach()
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp(min=1)


def mse_detached_nll(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    logvar_min: float = -10.0,
    logvar_max: float = 6.0,
    label_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error for the mean plus the Gaussian NLL of the variance around the *detached* mean.

    The mean is fitted exactly as by :func:`masked_mse` (its gradient does not depend on the predicted
    variance), and the variance head learns the size of the remaining error, so the uncertainties stay
    calibrated without the variance being able to excuse a poor mean.
    """
    mask, t = _masked(target)
    m = mean.float()
    lv = logvar.float().clamp(logvar_min, logvar_max)
    sq = (t - m) ** 2
    per = sq + _half_nll(lv, sq.detach(), label_var)
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp(min=1)


LOSSES = ("nll", "beta_nll", "mse")


def training_loss(
    kind: str,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    logvar_min: float = -10.0,
    logvar_max: float = 6.0,
    beta: float = 0.5,
    label_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss ``kind``: ``'nll'`` (:func:`gaussian_nll`), ``'beta_nll'`` (:func:`beta_nll`)
    or ``'mse'`` (:func:`mse_detached_nll`: squared error for the mean, NLL for the variance)."""
    if kind == "nll":
        return gaussian_nll(mean, logvar, target, logvar_min, logvar_max, label_var)
    if kind == "beta_nll":
        return beta_nll(mean, logvar, target, beta, logvar_min, logvar_max, label_var)
    if kind == "mse":
        return mse_detached_nll(mean, logvar, target, logvar_min, logvar_max, label_var)
    raise ValueError(f"unknown loss {kind!r}; one of {LOSSES}")
