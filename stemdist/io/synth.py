"""Synthetic 4D-STEM cubes with known truth, written chunk by chunk (any size, bounded memory).

Each pattern is a bright-field disk whose centre shifts and whose intensity dips smoothly over a
lattice of "atomic columns" in the scan, plus a weaker annular dark-field signal that rises on the
columns. ``truth`` holds the expected counts (``dose`` electrons per pattern), ``noisy`` Poisson draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ..errors import InputError
from .formats import AXES
from .zarr_store import create_cube, default_tile

LATTICE = 8.0  # scan positions between atomic columns
COLUMN_SIGMA = 1.6  # column width in scan positions


def columns(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Column strength in [0, 1] at scan positions: Gaussians on a square lattice."""
    dy = (yy + LATTICE / 2) % LATTICE - LATTICE / 2
    dx = (xx + LATTICE / 2) % LATTICE - LATTICE / 2
    return np.exp(-(dy**2 + dx**2) / (2 * COLUMN_SIGMA**2))


def expected_patterns(yy: np.ndarray, xx: np.ndarray, P: int, Q: int, dose: float) -> np.ndarray:
    """Expected counts ``(n, P, Q)`` at scan positions ``yy, xx`` (1-D arrays of equal length)."""
    c = columns(yy, xx)[:, None, None]
    r = min(P, Q) / 5.0
    # the disk moves towards the nearest column (a centre-of-mass signal) by up to ~r/6
    shift_y = (r / 6) * np.sin(2 * np.pi * yy / LATTICE)[:, None, None]
    shift_x = (r / 6) * np.sin(2 * np.pi * xx / LATTICE)[:, None, None]
    ky = np.arange(P, dtype=np.float64)[None, :, None] - (P - 1) / 2 - shift_y
    kx = np.arange(Q, dtype=np.float64)[None, None, :] - (Q - 1) / 2 - shift_x
    rho = np.sqrt(ky**2 + kx**2)
    disk = 1.0 / (1.0 + np.exp((rho - r) / 0.6)) * (1.0 - 0.45 * c)
    ring = ((rho > 1.3 * r) & (rho < 2.4 * r)) * (0.015 + 0.12 * c) * np.exp(-(rho - 1.3 * r) / r)
    pattern = disk + ring + 0.002
    pattern /= pattern.sum(axis=(1, 2), keepdims=True)
    return (pattern * dose).astype(np.float32)


def synth(out: str | Path, scan: tuple[int, int], det: tuple[int, int], dose: float, seed: int = 0,
          tile: int | None = None, overwrite: bool = False) -> zarr.Group:
    """Write a group with ``noisy`` (Poisson counts) and ``truth`` (expected counts) to ``out``."""
    H, W = scan
    P, Q = det
    if H < 3 or W < 3:
        raise InputError(f"synth: the scan must be at least 3 x 3, got {H} x {W}")
    if P < 1 or Q < 1 or dose <= 0:
        raise InputError(f"synth: detector must be non-empty and dose > 0 (got {P} x {Q}, dose {dose})")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists; remove it or choose another path")
    shape = (H, W, P, Q)
    tile = tile or default_tile(shape)
    count_dtype = "uint16" if dose * 0.5 < 60000 else "uint32"
    group = zarr.open_group(str(out), mode="w")
    attrs = {"dose": dose, "seed": seed, "axes": AXES}
    truth = create_cube(group, "truth", shape, tile, "float32", attrs)
    noisy = create_cube(group, "noisy", shape, tile, count_dtype, attrs)
    group.attrs.update({"generator": "stemdist.synth", "scan": [H, W], "det": [P, Q], "dose": dose, "seed": seed})
    grid_y, grid_x = -(-H // tile), -(-W // tile)
    for cy in range(grid_y):
        for cx in range(grid_x):
            y0, y1, x0, x1 = cy * tile, min(H, (cy + 1) * tile), cx * tile, min(W, (cx + 1) * tile)
            yy, xx = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
            lam = expected_patterns(yy.ravel(), xx.ravel(), P, Q, dose).reshape(y1 - y0, x1 - x0, P, Q)
            rng = np.random.default_rng([seed, cy, cx])
            truth[y0:y1, x0:x1] = lam
            noisy[y0:y1, x0:x1] = rng.poisson(lam).astype(count_dtype)
    return group
