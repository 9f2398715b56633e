"""The reference's losses: z-normalised MSE warm-up, then Poisson NLL with optional mean/sum terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def znorm(t: torch.Tensor) -> torch.Tensor:
    """``(t - mean) / (std + 1e-6)`` over the whole batch tensor."""
    return (t - t.mean()) / (t.std() + 1e-6)


def warmup_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(znorm(pred), znorm(target))


def poisson_nll(rate: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``rate - counts · log(rate)`` with the rate clamped to >= 1e-8 (no Stirling term), each
    detector pixel weighted by ``weight`` (P, Q) when given."""
    rate = rate.clamp(min=1e-8)
    nll = rate - counts * torch.log(rate)
    return (nll * weight).mean() if weight is not None else nll.mean()


def pixel_weights(mean_pattern: torch.Tensor, power: float) -> torch.Tensor:
    """``(mean / m) ** power`` per detector pixel, normalised to a mean of 1. Any positive weight leaves the
    Poisson loss's minimiser (the expected counts) unchanged; ``power`` 1 makes every pixel count in relative
    terms, so the faint dark-field pixels learn as fast as the bright-field disk."""
    m = mean_pattern.float().clamp(min=1e-12)
    w = (m.mean() / m) ** power
    return w / w.mean()


def poisson_loss(pred: torch.Tensor, target: torch.Tensor, mean_weight: float = 0.0,
                 sum_weight: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Poisson NLL (pixels weighted by ``weight``) plus ``mean_weight`` x MSE of per-pattern means and
    ``sum_weight`` x MSE of sums."""
    loss = poisson_nll(pred, target, weight)
    dims = tuple(range(1, pred.ndim))
    if mean_weight:
        loss = loss + mean_weight * F.mse_loss(pred.mean(dims), target.mean(dims))
    if sum_weight:
        loss = loss + sum_weight * F.mse_loss(pred.sum(dims), target.sum(dims))
    return loss
