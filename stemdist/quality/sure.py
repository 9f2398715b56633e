"""Stein's unbiased risk estimate (SURE) of Gaussian smoothing over the scan, for Poisson counts: the width
that minimises it is chosen from the data alone (no truth). Used by the fusion of the final cube and by
the ``gaussian_sure`` baseline.

For Poisson counts ``y`` with expectation ``x`` and an estimate ``f(y)``,
``E|f(y) - x|² = E[|f(y) - y|² + 2 Σ_p (∂f_p/∂y_p) y_p - Σ_p y_p]``: the risk of any smoother follows from
the data and the smoother's weight on each position itself."""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

TRUNCATE = 3.0  # Gaussian kernels are cut at 3 sigma
CANDIDATES = np.arange(0.0, 4.01, 0.25)  # scan sigmas tried by SURE, in probe positions


def self_weights(n: int, sigma: float) -> np.ndarray:
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
    self_weight = own_weights(y.shape, sigma)
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


def dispersion_z(counts: np.ndarray) -> float:
    """How far a counts image varies beyond Poisson noise around its mean, in standard errors: its index of
    dispersion ``Σ (y - m)² / m`` is χ² with ``N - 1`` degrees of freedom for Poisson counts of one
    expectation, so ``(D - (N - 1)) / √(2 (N - 1))`` is about a standard normal there and large where the
    image holds a signal (or noise beyond Poisson: read-out noise, a flickering beam)."""
    y = np.asarray(counts, np.float64).ravel()
    m = y.mean()
    if y.size < 2 or m <= 0:
        return 0.0
    return float((((y - m) ** 2).sum() / m - (y.size - 1)) / np.sqrt(2 * (y.size - 1)))


FUSION_S1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # scan widths smoothing the network's image
FUSION_S2 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # scan widths smoothing the residual


def scan_smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian of ``sigma`` positions over the scan, the first two axes (``a`` itself for 0)."""
    if not sigma:
        return a
    return ndimage.gaussian_filter(a, (sigma, sigma) + (0,) * (a.ndim - 2), truncate=TRUNCATE, mode="reflect")


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)``: row ``i`` holds the weights :func:`scan_smooth` gives each position of an axis of ``n`` for
    output ``i`` (reflected ends, cut at :data:`TRUNCATE` sigma)."""
    return ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, truncate=TRUNCATE, mode="reflect")


def scan_smooth_at(a: np.ndarray, sigma: float, rows: slice, cols: slice) -> np.ndarray:
    """``scan_smooth(a, sigma)[rows, cols]``, computed at those positions only: two matrix products over the
    scan axes, where SciPy's filter would smooth every position of ``a`` (a block with its halo) and keep a
    few (about 12x faster on a 46² block kept at its 16² centre)."""
    if not sigma:
        return a[rows, cols]
    k0 = _smoothing_matrix(a.shape[0], float(sigma))[rows].astype(a.dtype)
    k1 = _smoothing_matrix(a.shape[1], float(sigma))[cols].astype(a.dtype)
    out = np.tensordot(np.tensordot(k0, a, axes=(1, 0)), k1, axes=(1, 1))  # (rows, P, Q, cols)
    return np.ascontiguousarray(np.moveaxis(out, -1, 1))


def own_weights(shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Per scan position, the weight :func:`scan_smooth` gives the position itself (reflected edges)."""
    return np.outer(self_weights(shape[0], sigma), self_weights(shape[1], sigma))


def neighbour_weight(s1: float, halo: int = 1) -> float:
    """Weight on a position itself of ``G_{s1} N``, where ``N`` averages the neighbours of a ``2 halo + 1``
    window (8 or 24): how much of a position's own counts the smoothed network's image would pass back to it
    if the network were its neighbours' mean (an interior position; the scan's edges are a small share)."""
    n = 2 * halo + 1
    mean = np.full((n, n), 1 / (n * n - 1))
    mean[halo, halo] = 0
    r = int(TRUNCATE * s1 + 0.5) + 2 + halo
    delta = np.zeros((2 * r + 1, 2 * r + 1))
    delta[r, r] = 1.0
    return float(ndimage.convolve(scan_smooth(delta, s1), mean, mode="constant")[r, r])


def fusion_choice(counts: np.ndarray, network: np.ndarray, s1s=FUSION_S1, s2s=FUSION_S2, halo: int = 1
                  ) -> tuple[float, float, float, float]:
    """``(s1, s2, g, w)`` minimising SURE of ``w G_{s1}(network) + g G_{s2}(counts - w G_{s1}(network))`` for
    one virtual image: ``counts`` the raw image, ``network`` the blind-spot network's, which does not depend
    on a position's own counts but does on its neighbours' (``halo``). How much is unknown without running
    the network again, so each of the two places it enters the risk takes the end of its range that makes a
    candidate look worse: smoothing the network passes back at most what its neighbours' mean would
    (:func:`neighbour_weight`), and the residual's correction is credited with removing none of it. The
    choice so errs towards the network as it is and towards less of the raw residual (measured: crediting
    the correction as if the network were its neighbours' mean added raw noise, MoS2 dose 20 BF error
    2.9 -> 5.4x the network's). ``w`` is 1, or 0 where the raw counts alone have the lower risk: their
    image's mean plus ``g`` x their deviations smoothed by ``s2`` (:func:`level_risk`; ``g`` = 1 is a plain
    Gaussian, ``g`` = 0 the mean everywhere), so the network is never used where it does worse. ``g`` in
    [0, 1] is exact for each pair of widths: SURE is quadratic in it."""
    y = np.asarray(counts, np.float64)
    lam = np.asarray(network, np.float64)
    if y.shape != lam.shape or y.ndim != 2:
        raise ValueError(f"fusion_choice: two 2-D images of one shape are needed, got {y.shape} and {lam.shape}")
    best = (0.0, 0.0, 1.0, 0.0, np.inf)
    for s2 in s2s:  # the raw counts alone, shrunk towards their mean
        g, risk = level_risk(y, float(s2))
        if risk < best[4]:
            best = (0.0, float(s2), g, 0.0, risk)
    for s1 in s1s:
        for s2 in s2s:
            g, risk = fusion_risk(y, lam, float(s1), float(s2), halo)
            if risk < best[4]:
                best = (float(s1), float(s2), g, 1.0, risk)
    return best[:4]


def level_risk(counts: np.ndarray, s2: float) -> tuple[float, float]:
    """``(g, SURE)`` of ``m + g G_{s2}(counts - m)``, ``m`` the image's mean and ``g`` the risk's minimiser in
    [0, 1]: the counts' Gaussian shrunk towards their mean (``g`` = 0: the mean everywhere, right where the
    truth's image is flat, as the total counts of a simulated cube are). The mean passes ``1 / N`` of a
    position's own counts back to it."""
    y = np.asarray(counts, np.float64)
    m = y.mean()
    b = scan_smooth(y - m, s2)
    own = own_weights(y.shape, s2)
    bb = float((b * b).sum())
    g = 0.0 if bb == 0 else float(np.clip(((b * (y - m)).sum() - (own * y).sum() + y.sum() / y.size) / bb, 0, 1))
    self_weight = g * own + (1 - g) / y.size
    return g, float(((m + g * b - y) ** 2).sum() + 2 * (self_weight * y).sum() - y.sum())


def fusion_risk(counts: np.ndarray, network: np.ndarray, s1: float, s2: float, halo: int = 1,
                g: float | None = None) -> tuple[float, float]:
    """``(g, SURE)`` of ``G_{s1}(network) + g G_{s2}(counts - G_{s1}(network))``, ``g`` the risk's minimiser in
    [0, 1] unless given; the network's dependence on its neighbours bounded as in :func:`fusion_choice`
    (exact for ``g = 0`` and a network that is its neighbours' mean)."""
    y = np.asarray(counts, np.float64)
    a = scan_smooth(np.asarray(network, np.float64), s1)
    b = scan_smooth(y - a, s2)
    own = own_weights(y.shape, s2)
    via = neighbour_weight(s1, halo)
    if g is None:
        bb = float((b * b).sum())
        g = 0.0 if bb == 0 else float(np.clip(((b * (y - a)).sum() - (own * y).sum()) / bb, 0, 1))
    return g, float(((a + g * b - y) ** 2).sum() + 2 * ((g * own + via) * y).sum() - y.sum())
