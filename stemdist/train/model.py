"""The blind-spot U-Net: 8 neighbouring patterns in, the centre pattern out (non-negative rates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net of widths ``base · 2**k`` (k = 0..depth); the head's output is squared.

    Any detector size works: the input is zero-padded to a multiple of ``2**depth`` and the output
    cropped back.
    """

    def __init__(self, in_channels: int = 8, base_width: int = 24, depth: int = 4):
        super().__init__()
        widths = [base_width * 2**k for k in range(depth + 1)]
        self.depth = depth
        ins = [in_channels] + widths[:-2]
        self.down = nn.ModuleList(block(cin, cout) for cin, cout in zip(ins, widths[:-1], strict=True))
        self.bottleneck = block(widths[-2], widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[k + 1], widths[k], 2, stride=2) for k in range(depth))
        self.dec = nn.ModuleList(block(2 * widths[k], widths[k]) for k in range(depth))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P, Q = x.shape[-2:]
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
        return self.head(x).square()[..., :P, :Q]
