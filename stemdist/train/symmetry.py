"""Symmetries of a training sample (``train.augment``): flips and the transpose of the scan window, with
(``joint``) or without (``scan``) the same transform of the detector.

A mirrored specimen scanned by a symmetric probe gives the mirrored patterns at the mirrored positions, so a
sample transformed jointly (its neighbours permuted as the window is flipped, every pattern flipped the same
way) is a sample the physics could have produced; ``joint`` assumes the scan's and the detector's axes are
aligned (no scan rotation). ``scan`` permutes the neighbours only: it asks the network to predict the centre
whatever the window's orientation. The transpose is used only where the detector is square.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import torch

from ..data.tiles import neighbour_offsets

Augment = Literal["none", "scan", "joint"]
Element = tuple[bool, bool, bool]  # (transpose, flip rows, flip columns), applied in that order

ELEMENTS: tuple[Element, ...] = tuple((t, fi, fj) for t in (False, True) for fi in (False, True)
                                      for fj in (False, True))


def transform_offsets(offsets: np.ndarray, element: Element) -> np.ndarray:
    """Scan offsets ``(n, 2)`` moved by ``element``: transposed, then rows and columns flipped."""
    t, fi, fj = element
    o = offsets[:, ::-1] if t else offsets
    return o * np.array([-1 if fi else 1, -1 if fj else 1])


@cache
def channel_order(halo: int, element: Element) -> np.ndarray:
    """``order`` such that ``x[:, order]`` are the neighbours of the transformed window: the channel of offset
    ``o`` takes the original neighbour at the offset that ``element`` moves onto ``o``."""
    offsets = neighbour_offsets(halo)
    moved = transform_offsets(offsets, element)
    where = {tuple(o): k for k, o in enumerate(moved)}
    return np.array([where[tuple(o)] for o in offsets])


def transform_patterns(p: torch.Tensor, element: Element) -> torch.Tensor:
    """Patterns ``(..., P, Q)`` moved on the detector as ``element`` moves the scan."""
    t, fi, fj = element
    if t:
        p = p.transpose(-2, -1)
    dims = [d for d, f in ((-2, fi), (-1, fj)) if f]
    return p.flip(dims) if dims else p


def restore_patterns(p: torch.Tensor, element: Element) -> torch.Tensor:
    """The inverse of :func:`transform_patterns`: flips undone, then the transpose."""
    t, fi, fj = element
    dims = [d for d, f in ((-2, fi), (-1, fj)) if f]
    p = p.flip(dims) if dims else p
    return p.transpose(-2, -1) if t else p


def elements(mode: Augment, square: bool) -> tuple[Element, ...]:
    """The group a sample is drawn from: all 8 for ``scan`` (and ``joint`` on a square detector), else the
    four without the transpose; the identity only for ``none``."""
    if mode == "none":
        return ELEMENTS[:1]
    if mode == "joint" and not square:
        return tuple(e for e in ELEMENTS if not e[0])
    return ELEMENTS


def element_of(mode: Augment, shape: tuple[int, ...], draw: int) -> Element:
    """Element ``draw`` (any integer, taken modulo the group's size) of ``mode``'s group for patterns of ``shape``."""
    group = elements(mode, shape[-1] == shape[-2])
    return group[draw % len(group)]


def move_window(x: torch.Tensor, mode: Augment, halo: int, element: Element) -> torch.Tensor:
    """Inputs ``(B, m, P, Q)`` moved by ``element``: the neighbours permuted, and for ``joint`` every pattern moved
    on the detector too."""
    if mode == "none" or element == ELEMENTS[0]:
        return x
    x = x[:, torch.as_tensor(channel_order(halo, element), device=x.device)]
    return transform_patterns(x, element).contiguous() if mode == "joint" else x


def augment(x: torch.Tensor, y: torch.Tensor, mode: Augment, halo: int, element: Element
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``(x (B, m, P, Q), y (B, 1, P, Q))`` moved by ``element`` (the target moves on the detector with
    ``joint``)."""
    if mode == "joint" and element != ELEMENTS[0]:
        y = transform_patterns(y, element).contiguous()
    return move_window(x, mode, halo, element), y


def moved_back(out: torch.Tensor, mode: Augment, element: Element) -> torch.Tensor:
    """A prediction for moved inputs put back in the cube's frame (with ``scan`` the patterns never moved)."""
    return restore_patterns(out, element) if mode == "joint" else out


def draw(seed: int, step: int, rank: int) -> int:
    """The group element of optimiser step ``step`` on ``rank``: a function of the three only, so a resumed run
    draws what the uninterrupted one would."""
    return int(np.random.default_rng((seed, step, rank)).integers(1 << 30))
