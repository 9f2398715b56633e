"""The final estimate: the network's cube fused with the raw counts over the scan.

The blind-spot network predicts each pattern from its 8 neighbours only, about 8 x the dose of
one pattern. On a scan whose probes overlap, the signal varies smoothly from position to position,
so much more of the raw data says something about every position. The fused estimate keeps the
network's detail and takes the slowly varying part from the raw counts, which are unbiased:

    final = G_{s/2}(den) + G_{s, d}(raw - G_{s/2}(den))

``G_s`` is a Gaussian over the scan (``s`` in probe positions), ``G_{s, d}`` also smooths the
residual by ``d`` pixels over the detector. The residual corrects what the network gets wrong on
average (a darker bright-field disk, a brighter dark-field background); the light smoothing of the
network's cube averages out its own estimation noise. ``s`` is chosen from the data, without any
truth: the Gaussian width that minimises Stein's unbiased risk estimate (SURE) for smoothing the raw
virtual bright-field image, Poisson counts assumed. Coarse scans or high doses, where smoothing
would blur real contrast, get a small ``s`` (0: the network's cube unchanged).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import dask.array as da
import numpy as np
import zarr
from scipy import ndimage

from .. import faults
from ..data.tiles import Grid
from ..quality.sure import TRUNCATE


def depth(sigma: float) -> int:
    """Scan positions of halo a chunk needs for the fused estimate with ``sigma``."""
    return math.ceil(TRUNCATE * sigma / 2) + math.ceil(TRUNCATE * sigma)


def fuse_block(raw: np.ndarray, den: np.ndarray, sigma: float, detector_sigma: float = 1.0, *,
               overwrite: bool = False) -> np.ndarray:
    """The fused estimate of one block of positions (whole patterns), float32, clipped at 0.

    With ``overwrite``, ``den`` may serve as scratch space (one block of memory less); the inputs are
    otherwise left as they are.
    """
    den32 = np.asarray(den, np.float32)
    if sigma == 0:
        return den32
    smooth = ndimage.gaussian_filter(den32, (sigma / 2, sigma / 2, 0, 0), truncate=TRUNCATE, mode="reflect")
    residual = np.subtract(raw, smooth, dtype=np.float32)
    scratch = den32 if overwrite or den32 is not den else None
    smooth += ndimage.gaussian_filter(residual, (sigma, sigma, detector_sigma, detector_sigma), output=scratch,
                                      truncate=TRUNCATE, mode="reflect")
    return np.maximum(smooth, 0, out=smooth)  # expected counts are never negative


def _region(arr, ys: slice, xs: slice) -> np.ndarray:
    """``arr[ys, xs]`` as a numpy array (a Zarr array, or a dask array computed in this thread)."""
    part = arr[ys, xs]
    return part.compute(scheduler="synchronous") if isinstance(part, da.Array) else np.asarray(part)


def fuse_chunk(raw, den, out: zarr.Array, cy: int, cx: int, sigma: float, detector_sigma: float = 1.0) -> None:
    """Write scan chunk ``(cy, cx)`` of ``out``: the fused estimate of its positions, computed from the
    chunk plus a halo deep enough that the result equals fusing the whole cube at once."""
    H, W = out.shape[:2]
    ty, tx = out.chunks[:2]
    y0, y1, x0, x1 = cy * ty, min((cy + 1) * ty, H), cx * tx, min((cx + 1) * tx, W)
    h = depth(sigma)
    ya, yb, xa, xb = max(y0 - h, 0), min(y1 + h, H), max(x0 - h, 0), min(x1 + h, W)
    ys, xs = slice(ya, yb), slice(xa, xb)
    fused = fuse_block(_region(raw, ys, xs), _region(den, ys, xs), sigma, detector_sigma, overwrite=True)
    out[y0:y1, x0:x1] = fused[y0 - ya:y1 - ya, x0 - xa:x1 - xa]


def fuse_into(out: zarr.Array, raw, den, sigma: float, detector_sigma: float = 1.0, *, chunks: range | None = None,
              threads: int | None = None, progress=None) -> None:
    """Write the fused estimate of ``raw`` (Zarr) and ``den`` (Zarr or dask) into ``out``, chunk by chunk
    (``chunks``: which ones, in raster order over the scan; all by default). ``sigma`` 0 copies ``den``.

    Each output chunk is computed from its own region plus a halo and written at once, ``threads``
    chunks at a time and as many waiting (SciPy's filters release the GIL; default: up to 4 of this
    process's CPUs): memory is a few blocks, whatever the cube's size.
    """
    if tuple(raw.shape) != tuple(den.shape) or tuple(out.shape) != tuple(raw.shape):
        raise ValueError(f"fuse: raw {raw.shape}, denoised {den.shape} and output {out.shape} differ in shape")
    if sigma < 0 or detector_sigma < 0:
        raise ValueError(f"fuse: sigmas must be >= 0, got {sigma} and {detector_sigma}")
    grid = Grid.of(out)
    nx = grid.shape[1]
    if chunks is None:
        chunks = range(grid.n_tiles)
    if threads is None:
        threads = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for t in chunks:
            pending.append(pool.submit(fuse_chunk, raw, den, out, t // nx, t % nx, sigma, detector_sigma))
            while len(pending) > threads:
                pending.popleft().result()
                faults.point(f"final:{t}")
                if progress is not None:
                    progress(1)
        for t, f in enumerate(pending):
            f.result()
            faults.point(f"final:{t}")
            if progress is not None:
                progress(1)
