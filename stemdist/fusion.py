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

import dask.array as da
import numpy as np
from scipy import ndimage

TRUNCATE = 3.0  # Gaussian kernels are cut at 3 sigma
CANDIDATES = np.arange(0.0, 4.01, 0.25)  # scan sigmas tried by SURE, in probe positions


def _self_weights(n: int, sigma: float) -> np.ndarray:
    """Per position along an axis of ``n``, the weight the 1-D Gaussian (reflected at the ends, as used)
    gives the position itself: larger near the ends, where the reflection folds the kernel back."""
    if sigma == 0:
        return np.ones(n)
    eye = np.eye(n)
    return np.diagonal(ndimage.gaussian_filter1d(eye, sigma, axis=0, truncate=TRUNCATE, mode="reflect")).copy()


def sure_risk(counts: np.ndarray, sigma: float) -> float:
    """SURE of smoothing a Poisson ``counts`` image by a Gaussian of ``sigma``: unbiased for the squared
    error against the expected counts (each pixel's variance estimated by its counts)."""
    y = np.asarray(counts, np.float64)
    smooth = ndimage.gaussian_filter(y, sigma, truncate=TRUNCATE, mode="reflect") if sigma else y
    self_weight = np.outer(_self_weights(y.shape[0], sigma), _self_weights(y.shape[1], sigma))
    return float(((smooth - y) ** 2).sum() + ((2 * self_weight - 1) * y).sum())


def sure_sigma(counts: np.ndarray, candidates: np.ndarray = CANDIDATES) -> float:
    """The scan sigma (among ``candidates``) that minimises :func:`sure_risk` on a raw virtual image."""
    y = np.asarray(counts, np.float64)
    if y.ndim != 2 or min(y.shape) < 3:
        raise ValueError(f"sure_sigma: a 2-D image of at least 3 x 3 positions is needed, got {y.shape}")
    if not np.isfinite(y).all() or (y < 0).any():
        raise ValueError("sure_sigma: the image must hold non-negative finite counts")
    risks = [sure_risk(y, float(s)) for s in candidates]
    return float(candidates[int(np.argmin(risks))])


def depth(sigma: float) -> int:
    """Scan positions of halo a chunk needs for :func:`fuse` with ``sigma``."""
    return math.ceil(TRUNCATE * sigma / 2) + math.ceil(TRUNCATE * sigma)


def fuse_block(raw: np.ndarray, den: np.ndarray, sigma: float, detector_sigma: float = 1.0) -> np.ndarray:
    """The fused estimate of one block of positions (whole patterns), float32, clipped at 0."""
    den = np.asarray(den, np.float32)
    if sigma == 0:
        return den
    smooth = ndimage.gaussian_filter(den, (sigma / 2, sigma / 2, 0, 0), truncate=TRUNCATE, mode="reflect")
    residual = np.asarray(raw, np.float32) - smooth
    smooth += ndimage.gaussian_filter(residual, (sigma, sigma, detector_sigma, detector_sigma),
                                      truncate=TRUNCATE, mode="reflect")
    return np.maximum(smooth, 0, out=smooth)  # expected counts are never negative


def fuse(raw: da.Array, den: da.Array, sigma: float, detector_sigma: float = 1.0) -> da.Array:
    """Lazy :func:`fuse_block` over whole cubes, chunk by chunk with a halo (reflected at the scan's edge)."""
    if raw.shape != den.shape:
        raise ValueError(f"fuse: raw {raw.shape} and denoised {den.shape} differ in shape")
    if sigma < 0 or detector_sigma < 0:
        raise ValueError(f"fuse: sigmas must be >= 0, got {sigma} and {detector_sigma}")
    den = den.astype(np.float32)
    if sigma == 0:
        return den
    h = depth(sigma)
    chunks, halo = {2: -1, 3: -1}, {2: 0, 3: 0}
    for a in (0, 1):
        if h >= den.shape[a]:  # a short scan axis: one chunk, the filter reflects at both ends itself
            chunks[a], halo[a] = den.shape[a], 0
        else:  # every chunk at least as deep as the halo (small chunks of large patterns)
            chunks[a], halo[a] = max(min(den.chunks[a]), h), h
    den = den.rechunk(chunks)
    raw = raw.rechunk(den.chunks)
    return da.map_overlap(fuse_block, raw, den, sigma=sigma, detector_sigma=detector_sigma, depth=halo,
                          boundary={0: "reflect", 1: "reflect", 2: "none", 3: "none"}, dtype=np.float32)
