"""The blind-spot U-Net: the neighbouring patterns in (8, or 24; with ``model.centre`` also the centre's own
counts), the centre pattern out (non-negative rates)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Head = Literal["square", "mean_exp"]


def block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net of widths ``base · 2**k`` (k = 0..depth) with one of two heads:

    - ``square`` (the reference): counts in, the head's output squared;
    - ``mean_exp``: the network corrects the data's mean pattern ``m`` multiplicatively: inputs are divided
      by ``m``'s mean over the detector (a dose-free scale) and the output is ``m · exp(head)``. An untrained
      network predicts the mean pattern, so totals, bright- and dark-field levels start right, and every
      detector region learns in relative terms. ``m`` is a buffer (saved with the weights): set it with
      :meth:`set_mean_pattern` before training.

    With ``mean_channel`` one more input channel holds ``log(m / mean(m)) / 4``: where on the detector each pixel lies,
    as its expected level (needs :meth:`set_mean_pattern` too; measured worse, README, Quality). With ``centre``
    the last data channel is the centre pattern's own counts (``model.centre``: trained on a thinned share of them).

    Any detector size works: the input is zero-padded to a multiple of ``2**depth`` and the output
    cropped back.
    """

    def __init__(self, in_channels: int = 8, base_width: int = 24, depth: int = 4, head: Head = "square",
                 mean_channel: bool = False, centre: bool = False):
        super().__init__()
        if head not in ("square", "mean_exp"):
            raise ValueError(f"unknown head {head!r} (square, mean_exp)")
        widths = [base_width * 2**k for k in range(depth + 1)]
        self.depth, self.head_kind, self.mean_channel = depth, head, mean_channel
        self.centre = centre  # the last input channel is the centre pattern's own counts
        ins = [in_channels + int(centre) + int(mean_channel)] + widths[:-2]
        self.down = nn.ModuleList(block(cin, cout) for cin, cout in zip(ins, widths[:-1], strict=True))
        self.bottleneck = block(widths[-2], widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[k + 1], widths[k], 2, stride=2) for k in range(depth))
        self.dec = nn.ModuleList(block(2 * widths[k], widths[k]) for k in range(depth))
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.register_buffer("mean_pattern", torch.ones(1, 1))
        if head == "mean_exp":  # start at the mean pattern: exp(0) = 1
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def set_mean_pattern(self, mean: torch.Tensor | np.ndarray) -> None:
        """The data's mean pattern ``(P, Q)`` (counts per pixel), which the ``mean_exp`` head corrects."""
        m = torch.as_tensor(mean, dtype=torch.float32).clamp(min=0)
        if m.ndim != 2 or not torch.isfinite(m).all() or m.sum() <= 0:
            raise ValueError(f"mean pattern must be a finite, non-zero (P, Q) image, got shape {tuple(m.shape)}")
        # a floor keeps log-space corrections finite on pixels that never saw a count
        self.mean_pattern = m.clamp(min=1e-3 * float(m.mean())).to(self.head.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "mean_pattern"
        if key in state_dict:  # its shape is the detector's, known only once trained
            self.mean_pattern = torch.empty_like(state_dict[key], device=self.mean_pattern.device)
        else:  # weights of earlier versions (square head only)
            state_dict[key] = self.mean_pattern
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P, Q = x.shape[-2:]
        if (self.head_kind == "mean_exp" or self.mean_channel) and self.mean_pattern.shape != (P, Q):
            raise ValueError(f"the network's mean pattern is {tuple(self.mean_pattern.shape)}, "
                             f"the patterns are {(P, Q)}: set_mean_pattern first")
        if self.head_kind == "mean_exp":
            x = x / self.mean_pattern.mean()
        if self.mean_channel:  # where on the detector each pixel lies, as its expected level (log, dose-free)
            level = torch.log(self.mean_pattern / self.mean_pattern.mean()) / 4
            x = torch.cat([x, level.to(x.dtype).expand(x.shape[0], 1, P, Q)], dim=1)
        m = 2**self.depth
        x = F.pad(x, (0, -Q % m, 0, -P % m))
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for k in reversed(range(self.depth)):
            x = self.dec[k](torch.cat([self.up[k](x), skips[k]], dim=1))
        out = self.head(x)[..., :P, :Q]
        if self.head_kind == "mean_exp":
            return self.mean_pattern * torch.exp(out.float().clamp(max=20.0))
        return out.square()
