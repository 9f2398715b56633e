"""Classical denoising baselines, streamed chunk by chunk with bounded memory: the bar stemdist must clear.

``evaluate --baselines`` scores the whole ladder (:func:`compute`, :func:`write`): scan Gaussians at several
widths and at the SURE width, the mean pattern (the Gaussian's infinite width), the 8-neighbour mean, PCA,
PCA followed by the SURE-width Gaussian, and the mean pattern fused with the raw counts as stemdist fuses
its network's cube; the best of them *for each image* (BF, ADF, CoM, ...) is the bar.

- ``gaussian``: Gaussian smoothing over the two scan axes (sigma in probe positions, truncated at
  4 sigma, half-sample symmetric borders as ``scipy.ndimage`` ``mode="reflect"``); dask ``map_overlap``.
- ``neighbours``: the mean of the 8 neighbouring patterns (the same input the blind-spot network
  sees; border positions use mirrored neighbours, index -1 -> 1, never the centre); ``map_overlap``.
- ``mean_pattern``: the raw cube's mean pattern at every position. At low dose a cube's PSNR is mostly
  its mean pattern's (the scan varies little against the noise), where this beats every finite width.
- ``fused_mean``: :func:`stemdist.run.fusion.choose_regions` and ``fuse_into`` with the mean pattern in
  the network's place: Gaussians of the raw counts shrunk towards the mean pattern, widths and weights
  per detector ring and sector chosen by SURE. What the final cube would be if the network learnt nothing
  beyond the mean pattern: the network's own contribution is the final's margin over it.
  ``fused_mean_wiener``: the same with the fusion's Wiener step (``output.fuse_wiener``, the default), so
  that no step of the fusion counts as the network's: each is a baseline of its own, the better one per
  image the bar.
- ``pca``: projection of every pattern onto the mean pattern plus the ``rank`` leading principal
  components of the patterns. The covariance is accumulated chunk by chunk (exact; detectors up to
  ``GRAM_LIMIT`` pixels), or found by dask's randomised ``svd_compressed`` for larger detectors.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from scipy import linalg, ndimage

from ..io.zarr_store import create_cube
from ..layout import mark_complete
from .metrics import _lazy

GRAM_LIMIT = 4096  # detector pixels up to which the PCA covariance (P·Q)² is accumulated exactly
SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)  # the scan Gaussians of the ladder, in probe positions
# every baseline's name starts with one of these
PREFIXES = ("gaussian", "mean_pattern", "fused_mean", "neighbours", "pca")


def is_baseline(name: str) -> bool:
    return name.startswith(PREFIXES)


def gaussian(arr, sigma: float = 1.0, truncate: float = 4.0) -> da.Array:
    """Lazy Gaussian smoothing over the scan axes."""
    d = _lazy(arr).astype(np.float32)
    depth = max(1, int(truncate * sigma + 0.5))
    depth = min(depth, d.shape[0] - 1, d.shape[1] - 1)

    def block(b: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(b, sigma=(sigma, sigma, 0, 0), truncate=truncate, mode="reflect")

    return d.map_overlap(block, depth={0: depth, 1: depth, 2: 0, 3: 0},
                         boundary={0: "reflect", 1: "reflect", 2: "none", 3: "none"}, dtype=np.float32)


NEIGHBOURS = np.ones((3, 3, 1, 1), np.float32) / 8
NEIGHBOURS[1, 1] = 0


def neighbour_mean(arr) -> da.Array:
    """Lazy mean of the 8 neighbours of every position (mirrored at the scan border)."""
    d = _lazy(arr).astype(np.float32)
    padded = da.pad(d, ((1, 1), (1, 1), (0, 0), (0, 0)), mode="reflect")  # -1 -> 1: never the centre

    def block(b: np.ndarray) -> np.ndarray:
        return ndimage.correlate(b, NEIGHBOURS, mode="nearest")  # the border it touches is trimmed

    out = padded.map_overlap(block, depth={0: 1, 1: 1, 2: 0, 3: 0}, boundary="none", dtype=np.float32)
    return out[1:-1, 1:-1]


def pca_basis(arr, rank: int, exact: bool | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mean pattern (P·Q,), components (P·Q, rank))`` of the patterns, streamed over the chunks."""
    d = _lazy(arr)
    H, W, P, Q = d.shape
    n, m = H * W, P * Q
    rank = int(max(1, min(rank, m, n)))
    if exact is None:
        exact = m <= GRAM_LIMIT
    d = d.rechunk({2: -1, 3: -1})
    if exact:
        total = np.zeros(m)
        gram = np.zeros((m, m))
        for idx in np.ndindex(d.numblocks[:2]):
            x = np.asarray(d.blocks[idx + (0, 0)].compute(), np.float64).reshape(-1, m)
            total += x.sum(axis=0)
            gram += x.T @ x
        mu = total / n
        cov = gram / n - np.outer(mu, mu)
        w, v = linalg.eigh(cov, subset_by_index=[m - rank, m - 1])  # the top ``rank`` only: half the time
        return mu, v[:, np.argsort(w)[::-1]]
    mu = d.astype(np.float64).mean(axis=(0, 1)).compute().ravel()
    x = d.astype(np.float64).reshape(n, m) - mu
    x = x.rechunk({0: max(1, min(n, int(2**25 // (8 * m)))), 1: -1})
    _, _, vt = da.linalg.svd_compressed(x, rank, n_power_iter=4, seed=seed)
    return mu, np.asarray(vt.compute()).T


def pca(arr, rank: int = 8, exact: bool | None = None) -> da.Array:
    """Lazy rank-``rank`` PCA reconstruction of every pattern (the basis is computed now)."""
    d = _lazy(arr)
    P, Q = d.shape[2:]
    mu, v = pca_basis(d, rank, exact)
    proj = v @ v.T

    def block(b: np.ndarray) -> np.ndarray:
        x = np.asarray(b, np.float64).reshape(-1, P * Q) - mu
        return (mu + x @ proj).reshape(b.shape).astype(np.float32)

    return d.rechunk({2: -1, 3: -1}).map_blocks(block, dtype=np.float32)


def mean_pattern(arr, mean: np.ndarray | None = None) -> da.Array:
    """Lazy cube holding the mean pattern (``mean``, or computed in the same graph) at every position,
    chunked as ``arr``."""
    d = _lazy(arr)
    m = d.astype(np.float64).mean(axis=(0, 1)) if mean is None else da.from_array(np.asarray(mean))
    return da.broadcast_to(m.astype(np.float32), d.shape, chunks=d.chunks)


def compute(arr, sure_sigma: float, sigmas=SIGMAS, rank: int = 8) -> dict[str, tuple[da.Array, dict]]:
    """The ladder of lazy baseline cubes by name, each with its parameters: ``gaussian_S`` for each of
    ``sigmas``, ``gaussian_sure`` (the SURE width, from the raw bright-field image), ``mean_pattern``,
    ``neighbours``, ``pca`` (``rank``) and ``pca_gaussian`` (PCA, then the SURE-width Gaussian)."""
    d = _lazy(arr)
    out = {f"gaussian_{s:g}": (gaussian(d, s), {"sigma": float(s)}) for s in sigmas}
    out["gaussian_sure"] = (gaussian(d, sure_sigma) if sure_sigma > 0 else d.astype(np.float32),
                            {"sigma": float(sure_sigma), "chosen_by": "SURE on the raw bright-field image"})
    out["mean_pattern"] = (mean_pattern(d), {"sigma": "infinite"})
    out["neighbours"] = (neighbour_mean(d), {})
    out["pca"] = (pca(d, rank), {"rank": rank})
    out["pca_gaussian"] = (gaussian(out["pca"][0], sure_sigma) if sure_sigma > 0 else out["pca"][0],
                           {"rank": rank, "sigma": float(sure_sigma)})
    return out


def fused_mean(arr: zarr.Array, out: zarr.Array, sure_sigma: float, sectors: int, wiener: bool = False) -> dict:
    """Write into ``out`` the raw mean pattern fused with the raw counts by SURE per detector region, as
    ``output.fuse_by: regions`` fuses a network's cube (the shares' width capped at half ``sure_sigma``,
    as the run's final does; ``sectors`` per ring, as ``output.fuse_sectors``; ``wiener``: with its Wiener
    step); returns the fusion's plan."""
    from ..run import fusion  # the run's own fusion, with the mean pattern in the network's place

    mean = da.from_zarr(arr).astype(np.float64).mean(axis=(0, 1)).compute()
    flat = mean_pattern(arr, mean)  # computed once: each chunk of the fusion reads it without another pass
    plan = fusion.plan_regions(arr, flat, mean, sectors, sure_sigma / 2, wiener=wiener)
    fusion.fuse_into(out, arr, flat, plan)
    return plan.describe()


def write(arr: zarr.Array, out: str | Path, sure_sigma: float, sigmas=SIGMAS, rank: int = 8,
          tile: int | None = None, sectors: int = 8) -> dict[str, zarr.Array]:
    """Compute the baselines of ``arr`` into Zarr arrays of the group ``out`` (streamed): the ladder of
    :func:`compute`, then ``fused_mean`` with ``sectors`` per ring (the run's ``output.fuse_sectors``)."""
    tile = tile or arr.chunks[0]
    group = zarr.open_group(str(out), mode="a")
    written = {}
    for name, (lazy, params) in compute(arr, sure_sigma, sigmas, rank).items():
        z = create_cube(group, name, tuple(arr.shape), tile, "float32", overwrite=True,
                        attrs={"baseline": name, **params})
        da.store(lazy.astype(np.float32).rechunk(z.chunks), z, lock=False)
        mark_complete(z)
        written[name] = z
    for name, wiener in (("fused_mean", False), ("fused_mean_wiener", True)):
        z = create_cube(group, name, tuple(arr.shape), tile, "float32", overwrite=True, attrs={"baseline": name})
        z.attrs["fuse_plan"] = fused_mean(arr, z, sure_sigma, sectors, wiener=wiener)
        mark_complete(z)
        written[name] = z
    return written
