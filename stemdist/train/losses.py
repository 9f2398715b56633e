"""The reference's losses: z-normalised MSE warm-up, then Poisson NLL with optional mean/sum terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def znorm(t: torch.Tensor) -> torch.Tensor:
    """``(t - mean) / (std + 1e-6)`` over the whole batch tensor."""
    return (t - t.mean()) / (t.std() + 1e-6)


def warmup_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(znorm(pred), znorm(target))


def poisson_nll(rate: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of ``rate - counts · log(rate)`` with the rate clamped to >= 1e-8 (no Stirling term)."""
    rate = rate.clamp(min=1e-8)
    return (rate - counts * torch.log(rate)).mean()


def poisson_loss(pred: torch.Tensor, target: torch.Tensor, mean_weight: float = 0.0,
                 sum_weight: float = 0.0) -> torch.Tensor:
    """Poisson NLL plus ``mean_weight`` x MSE of per-pattern means and ``sum_weight`` x MSE of sums."""
    loss = poisson_nll(pred, target)
    dims = tuple(range(1, pred.ndim))
    if mean_weight:
        loss = loss + mean_weight * F.mse_loss(pred.mean(dims), target.mean(dims))
    if sum_weight:
        loss = loss + sum_weight * F.mse_loss(pred.sum(dims), target.sum(dims))
    return loss
