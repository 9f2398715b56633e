"""Stein's unbiased risk estimate (SURE) of Gaussian smoothing over the scan, for Poisson counts: the width
that minimises it is chosen from the data alone (no truth). Used by the fusion of the final cube and by
the ``gaussian_sure`` baseline."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TRUNCATE = 3.0  # Gaussian kernels are cut at 3 sigma
CANDIDATES = np.arange(0.0, 4.01, 0.25)  # scan sigmas tried by SURE, in probe positions


def _self_weights(n: int, sigma: float) -> np.ndarray:
    """Per position along an axis of ``n``, the weight the 1-D Gaussian (reflected at the ends, as used)
    gives the position itself: larger near the ends, where the reflection folds the kernel back."""
    if sigma == 0:
        return np.ones(n)
    r = int(TRUNCATE * sigma + 0.5)  # SciPy's kernel radius
    delta = np.zeros(2 * r + 1)
    delta[r] = 1.0
    kernel = ndimage.gaussian_filter1d(delta, sigma, truncate=TRUNCATE, mode="constant")
    i = np.arange(n)
    out = np.zeros(n)
    for k in range(-r, r + 1):  # position i + k, reflected as SciPy does (d c b a | a b c d | d c b a)
        j = (i + k) % (2 * n)
        j = np.where(j >= n, 2 * n - 1 - j, j)
        out += np.where(j == i, kernel[r + k], 0.0)
    return out


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
