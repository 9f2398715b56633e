"""The final estimate: the network's cube fused with the raw counts over the scan.

The blind-spot network predicts each pattern from its 8 (or 24) neighbours only, about 8 x the dose of
one pattern. On a scan whose probes overlap, the signal varies smoothly from position to position,
so much more of the raw data says something about every position. The fused estimate keeps what the
network gets right and takes the rest from the raw counts, which are unbiased. Two plans, both chosen
from the data alone (no truth) with Stein's unbiased risk estimate (SURE, :mod:`stemdist.quality.sure`):

- :class:`Plan` (``output.fuse_by: bright_field``): one scan width ``s`` for every detector pixel,
  ``final = G_{s/2}(den) + G_{s, d}(raw - G_{s/2}(den))``, ``s`` the width that minimises SURE for
  smoothing the raw virtual bright-field image. ``G_s`` is a Gaussian over the scan (``s`` in probe
  positions), ``G_{s, d}`` also smooths by ``d`` pixels over the detector.
- :class:`RegionPlan` (``output.fuse_by: regions``): the detector is cut into regions (the bright-field
  disk, the dark-field ring out to 3 disk radii and what lies beyond, each in four quadrants so the centre
  of mass keeps its own choice). Each region's *total* gets the estimate that minimises SURE for its own
  virtual image: ``w G_{s1}(net) + g G_{s2}(raw - w G_{s1}(net))`` over the region's images, with a
  plain Gaussian of the raw counts (``w`` = 0) where that is better than anything built on the network.
  What lies *within* a region (the pattern's detail, which no virtual image of these regions sees)
  is the network's, corrected by ``g' G_{s', d}`` of its residual, with ``(s', d, g')`` chosen by SURE
  over every pixel of sampled chunks. The correction of a region's total is spread over its pixels in
  proportion to the network's own pattern, so bright-field, dark-field and centre-of-mass images get the
  smoothing their signal and noise call for, and the per-pixel detail its own. Last (``output.fuse_wiener``),
  each ring's sector totals are taken apart into harmonics (the ring's total, its two centre-of-mass
  dipoles, ...) and each harmonic is blended with the Wiener filter over the scan of its raw image, the
  fused image's spectrum as the pilot (:func:`wiener_regions`; the weight by SURE, at least an even mean,
  :func:`wiener_blend`): a Gaussian passes only low spatial
  frequencies, a crystal's images hold their signal in a few lattice frequencies, and the pilot says which.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property

import dask.array as da
import numpy as np
import zarr
from scipy import fft, ndimage, sparse

from .. import faults
from ..data.tiles import Grid
from ..quality.metrics import find_masks
from ..quality.sure import (
    FUSION_S2,
    TRUNCATE,
    dispersion_z,
    fusion_choice,
    own_weights,
    scan_smooth,
    scan_smooth_at,
    self_weights,
)

RINGS = (1.0, 1.2, 3.0)  # region edges in disk radii: bright-field disk, gap, dark-field ring (evaluate's), beyond
SECTORS = 8  # sectors per ring (output.fuse_sectors' default)


@dataclass(frozen=True)
class Plan:
    """The ``bright_field`` fusion: one scan width ``sigma`` for every detector pixel (0: the network's cube),
    ``G_{sigma/2}(den) + G_{sigma, d}(raw - G_{sigma/2}(den))``; ``detector_sigma`` is ``d``."""

    sigma: float
    detector_sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.detector_sigma < 0:
            raise ValueError(f"fuse: sigmas must be >= 0, got {self.sigma} and {self.detector_sigma}")

    def depth(self) -> int:
        """Scan positions of halo a chunk needs."""
        return math.ceil(TRUNCATE * self.sigma / 2) + math.ceil(TRUNCATE * self.sigma)

    def apply(self, raw: np.ndarray, den: np.ndarray, y0: int = 0, x0: int = 0,
              inner: tuple[slice, slice] | None = None) -> np.ndarray:
        """The fused block (float32, clipped at 0), or only its ``inner`` positions; the inputs are left as
        they are."""
        if inner is not None:
            return self.apply(raw, den, y0, x0)[inner]
        den32 = np.asarray(den, np.float32)
        if self.sigma == 0:
            return den32
        smooth = scan_smooth(den32, self.sigma / 2)
        residual = np.subtract(raw, smooth, dtype=np.float32)
        d = self.detector_sigma
        smooth += ndimage.gaussian_filter(residual, (self.sigma, self.sigma, d, d), truncate=TRUNCATE,
                                          mode="reflect")
        return np.maximum(smooth, 0, out=smooth)  # expected counts are never negative

    def describe(self) -> dict:
        return {"sigma": self.sigma}


def detector_regions(shape: tuple[int, int], center: tuple[float, float], bf_radius: float,
                     rings: tuple[float, ...] = RINGS, sectors: int = SECTORS) -> np.ndarray:
    """Region label of every detector pixel: ring (edges in disk radii) x angular sector."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    r = np.hypot(yy - center[0], xx - center[1]) / max(bf_radius, 1e-9)
    ring = np.searchsorted(np.asarray(rings, float), r)
    angle = np.arctan2(yy - center[0], xx - center[1]) + np.pi
    sector = np.minimum((angle / (2 * np.pi) * sectors).astype(int), sectors - 1)
    return ring * sectors + sector


DETAIL_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # scan widths tried for the detail's correction
DETAIL_DETECTOR = (0.0, 1.0)  # detector widths tried for the detail's correction
# the whole pattern's total is kept at its mean where its raw image's variation is within this many standard
# errors of Poisson noise's (:func:`stemdist.quality.sure.dispersion_z`; README, Quality: flat totals)
FLAT_Z = 3.0
PLAN_BYTES = 2 * 2**30  # the plan scores chunks at once while their blocks' working copies fit in this
PLAN_COPIES = 5  # working copies of a block a chunk's score holds at its peak (measured: 1.5 GB for a 0.3 GB block)
SAMPLE_CHUNKS = 12  # scan chunks whose every pixel scores the detail's candidates
SHARE_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # scan widths tried for the network's shares (up to a cap)


@dataclass(frozen=True)
class RegionPlan:
    """The ``regions`` fusion. Per position and region ``R`` of the detector, the fused total ``E_R`` (the
    network's plus ``correction``, computed once over the whole scan from the region images) is spread
    over the region's pixels by the network's shares ``π = net / net_R``, smoothed over the scan by
    ``share_sigma`` (the network's own estimation noise); the counts' own detail within regions
    (``raw - π raw_R``, smoothed by
    ``detector_sigma`` over the detector and ``detail_sigma`` over the scan) is added with weight
    ``detail_gain``. Region totals are exactly ``E_R``: the detail sums to 0 in every region, and
    patterns with negative pixels are clipped and rescaled within each region."""

    labels: np.ndarray  # (P, Q) region of each detector pixel
    shares: np.ndarray  # (P, Q) each pixel's share of its region in the mean pattern (where the network has 0)
    correction: np.ndarray  # (H, W, n) float32
    share_sigma: float
    detail_sigma: float
    detector_sigma: float
    detail_gain: float
    choices: dict  # SURE's choices: the total's (s1, s2, g, w), each ring's and sector's split (s, g, shares)
    share_gain: np.ndarray | None = None  # (P, Q) the network's pattern x this before its shares (radial_gain)

    def depth(self) -> int:
        return math.ceil(TRUNCATE * self.share_sigma) + math.ceil(TRUNCATE * self.detail_sigma)

    @property
    def n(self) -> int:
        return self.correction.shape[-1]

    @cached_property
    def onehot(self) -> np.ndarray:
        """``(P, Q, n)``: 1 where a pixel belongs to a region."""
        return np.eye(self.n, dtype=np.float32)[self.labels]

    def totals(self, block: np.ndarray) -> np.ndarray:
        """Sums over each region, ``(h, w, n)``."""
        return np.tensordot(block, self.onehot, axes=([2, 3], [0, 1]))

    def expand(self, per_region: np.ndarray) -> np.ndarray:
        """``(..., n)`` values per region to ``(..., P, Q)``: each pixel its region's (a flat ``take``, about 3x
        faster than indexing by the label image)."""
        flat = np.take(per_region.reshape(-1, self.n), self.labels.ravel(), axis=1)
        return flat.reshape(per_region.shape[:-1] + self.labels.shape)

    def spread(self, den: np.ndarray, at: tuple[slice, slice] | None = None) -> np.ndarray:
        """The network's share of its region's total at every pixel (its pattern times ``share_gain`` first),
        smoothed over the scan by ``share_sigma`` (sums to 1 over each region); at the positions ``at`` only,
        if given."""
        lam = np.asarray(den, np.float32)
        if self.share_gain is not None:
            lam = lam * self.share_gain
        tot = self.expand(self.totals(lam))
        own = np.where(tot > 1e-12, lam / np.maximum(tot, 1e-12), self.shares.astype(np.float32))
        return scan_smooth(own, self.share_sigma) if at is None else scan_smooth_at(own, self.share_sigma, *at)

    def detail(self, raw: np.ndarray, share: np.ndarray, detector_sigma: float) -> np.ndarray:
        """The counts less their region totals spread by ``share``, smoothed over the detector, less what
        that smoothing moved between regions: 0 summed over every region."""
        y = np.asarray(raw, np.float32)
        d = y - share * self.expand(self.totals(y))
        if detector_sigma:
            d = _detector_smooth(d, detector_sigma)
            d -= share * self.expand(self.totals(d))
        return d

    def detail_own(self, share: np.ndarray, detector_sigma: float) -> np.ndarray:
        """The weight :meth:`detail` gives each pixel's own count (the diagonal of that linear map at every
        position), exactly, edges of the detector and of the regions included: what SURE needs."""
        if not detector_sigma:
            return 1 - share  # the count, less its share of its region's total
        P, Q = self.labels.shape
        own = np.outer(self_weights(P, detector_sigma), self_weights(Q, detector_sigma)).astype(np.float32)
        spread_back = np.zeros_like(share)  # (G_d (share · 1_R))_k for k in R: what the smoothing of the shares returns
        kept = np.zeros(self.labels.shape, np.float32)  # (G_d 1_R)_k: how much of k's own region stays in it
        rad = int(TRUNCATE * detector_sigma + 0.5)  # SciPy's kernel radius: the smoothing of a region's
        for r in range(self.n):                        # pixels reads its bounding box and this margin only
            m = self.labels == r
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            box = slice(max(ys.min() - rad, 0), ys.max() + rad + 1), slice(max(xs.min() - rad, 0), xs.max() + rad + 1)
            mb = m[box]
            spread_back[..., m] = _detector_smooth(share[..., box[0], box[1]] * mb, detector_sigma)[..., mb]
            kept[m] = ndimage.gaussian_filter(m.astype(np.float32), detector_sigma, truncate=TRUNCATE,
                                              mode="reflect")[m]
        second = kept - self.expand(self.totals(kept * share))  # the projection's own weight, over the share
        return own - spread_back - share * second

    def fused_totals(self, den: np.ndarray, y0: int, x0: int) -> np.ndarray:
        h, w = den.shape[:2]
        return self.totals(np.asarray(den, np.float32)) + self.correction[y0:y0 + h, x0:x0 + w]

    def apply(self, raw: np.ndarray, den: np.ndarray, y0: int = 0, x0: int = 0,
              inner: tuple[slice, slice] | None = None) -> np.ndarray:
        """The fused block whose first position is ``(y0, x0)`` of the scan (float32, non-negative), or only
        its ``inner`` positions (the rest being their halo): each step is then computed where a later one
        reads it, no farther."""
        h, w = den.shape[:2]
        rows, cols = (slice(0, h), slice(0, w)) if inner is None else (
            slice(*inner[0].indices(h)[:2]), slice(*inner[1].indices(w)[:2]))
        reach = math.ceil(TRUNCATE * self.detail_sigma) if self.detail_gain else 0  # the detail's smoothing
        mid = (slice(max(rows.start - reach, 0), min(rows.stop + reach, h)),
               slice(max(cols.start - reach, 0), min(cols.stop + reach, w)))
        here = (slice(rows.start - mid[0].start, rows.stop - mid[0].start),
                slice(cols.start - mid[1].start, cols.stop - mid[1].start))  # inner within mid
        share = self.spread(den, mid)
        totals = np.maximum(self.fused_totals(den[rows, cols], y0 + rows.start, x0 + cols.start), 0)
        out = share[here] * self.expand(totals)
        if self.detail_gain:
            detail = self.detail(raw[mid], share, self.detector_sigma)
            out += np.float32(self.detail_gain) * scan_smooth_at(detail, self.detail_sigma, *here)
        return self.clip(out, totals)

    def clip(self, out: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """Negative pixels to 0, each region rescaled to keep its total."""
        np.maximum(out, 0, out=out)
        kept = self.totals(out)
        scale = np.where(kept > 0, totals / np.maximum(kept, 1e-30), 0).astype(np.float32)
        out *= self.expand(scale)
        return out

    def summary(self) -> str:
        s1, s2, g, w = self.choices["total"]
        total = f"raw mean + {g:.2f} x raw s {s2:g}" if not w else f"network s {s1:g} + {g:.2f} x residual s {s2:g}"
        z = self.choices.get("total_z")
        if z is not None and abs(z) <= FLAT_Z:
            total = f"raw mean (its image within Poisson noise, dispersion z {z:+.1f})"
        split = lambda c: ", ".join(f"({s:g}, {g:.2f}{', mean' if src == 'mean' else ''})"  # noqa: E731
                                    for s, g, src in c)
        return (f"total {total}; rings (s, g) [{split(self.choices['rings'])}]; sectors "
                f"[{split(self.choices['sectors'])}]; shares s {self.share_sigma:g}, "
                f"radial gain^{self.choices.get('share_gain', 0):g}; "
                f"detail s {self.detail_sigma:g}, "
                f"detector {self.detector_sigma:g}, g {self.detail_gain:.2f}"
                + self._wiener_summary())

    def _wiener_summary(self) -> str:
        blend = self.choices.get("wiener")
        if blend is None:
            return ""
        weights = "; ".join(" ".join(f"{a:.2f}" for a in ring) for ring in blend)
        return f"; each ring's harmonics blended with their Wiener, weights [{weights}]"


    def describe(self) -> dict:
        return {"total": dict(zip(("s1", "s2", "g", "w"), self.choices["total"], strict=True)),
                "total_dispersion_z": self.choices.get("total_z"),
                "rings": [{"s": s, "g": g, "shares": src} for s, g, src in self.choices["rings"]],
                "sectors": [{"s": s, "g": g, "shares": src} for s, g, src in self.choices["sectors"]],
                "share_sigma": self.share_sigma, "share_gain_power": self.choices.get("share_gain", 0.0),
                "detail_sigma": self.detail_sigma,
                "detail_detector_sigma": self.detector_sigma, "detail_gain": self.detail_gain,
                "wiener": self.choices.get("wiener") is not None, "wiener_blend": self.choices.get("wiener")}


def region_images(raw, den, labels: np.ndarray, den_mean: bool = False) -> tuple[np.ndarray, ...]:
    """Raw and network counts summed over each detector region, ``(H, W, n)`` each, in one streamed pass
    (``den_mean``: and the network's mean pattern, read in the same pass)."""
    onehot = np.eye(int(labels.max()) + 1)[labels]
    lazy = [a if isinstance(a, da.Array) else da.from_zarr(a) for a in (raw, den)]
    parts = [da.tensordot(a.astype(np.float64), onehot, axes=([2, 3], [0, 1])) for a in lazy]
    if den_mean:
        parts.append(lazy[1].astype(np.float64).mean(axis=(0, 1)))
    return da.compute(*parts)


def detector_rings(shape: tuple[int, int], center: tuple[float, float]) -> np.ndarray:
    """``(P, Q)``: each detector pixel's ring, one pixel wide, about ``center`` (0 at the centre)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - center[0], xx - center[1]).astype(int)


def radial_gain(raw_mean: np.ndarray, den_mean: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """``(P, Q)``: per ring of the detector (``ring``: :func:`detector_rings`), the raw mean pattern's counts over
    the network's (1 where the network has none): the network's mean pattern matched to the data's, radially."""
    num = np.bincount(ring.ravel(), np.asarray(raw_mean, np.float64).ravel())
    den = np.bincount(ring.ravel(), np.asarray(den_mean, np.float64).ravel())
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)[ring]


def _shares(part: np.ndarray, whole: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``part / whole`` where the whole is positive, ``fallback`` elsewhere."""
    return np.where(whole > 1e-12, part / np.maximum(whole, 1e-12), fallback)


def split_choice(counts: np.ndarray, shares: dict[str, np.ndarray], counts_whole: np.ndarray,
                 fused_whole: np.ndarray) -> tuple[float, float, str]:
    """``(s, g, source)`` minimising SURE of ``share · fused_whole + g G_s(counts - share · counts_whole)``: a
    part's total (a ring of the pattern, a sector of a ring) from its whole's fused total, split by one of
    ``shares`` (the network's, or the mean pattern's where the network's split is noisier than the counts'
    own) and corrected by the counts' own split. The whole's own dependence on the counts is the same for
    every candidate."""
    y = np.asarray(counts, np.float64)
    best = (0.0, 0.0, "", np.inf)
    for source, share in shares.items():
        share = np.broadcast_to(share, y.shape)
        base = share * fused_whole - y
        q = y - share * counts_whole
        base_risk = float((base * base).sum())
        for s in FUSION_S2:
            a = scan_smooth(q, s)
            own = own_weights(y.shape, s)
            aa, lin = float((a * a).sum()), float((a * base).sum() + (own * (1 - share) * y).sum())
            g = float(np.clip(-lin / aa, 0, 1)) if aa > 0 else 0.0
            risk = base_risk + 2 * g * lin + g * g * aa
            if risk < best[3]:
                best = (float(s), g, source, risk)
    return best[:3]


def sector_basis(sectors: int) -> np.ndarray:
    """``(sectors, sectors)`` orthonormal rows over a ring's sectors: their sum, then the cosine and sine
    harmonics of the sectors' centre angles (the first pair: the ring's dipoles, i.e. its centre of mass),
    then the alternating row where the count is even."""
    phi = (np.arange(sectors) + 0.5) * 2 * np.pi / sectors - np.pi  # as :func:`detector_regions` numbers them
    rows = [np.ones(sectors)]
    for m in range(1, (sectors - 1) // 2 + 1):
        rows += [np.cos(m * phi), np.sin(m * phi)]
    if sectors % 2 == 0 and sectors > 1:
        rows.append(np.cos(sectors // 2 * (phi + np.pi / sectors)))  # +1, -1, +1, ...
    basis = np.stack(rows)
    return basis / np.linalg.norm(basis, axis=1, keepdims=True)


def scan_wiener(counts: np.ndarray, pilot: np.ndarray, noise: float) -> np.ndarray:
    """The empirical Wiener filter of an image over the scan: each coefficient of its orthonormal DCT
    (the mean taken out) kept in proportion ``P / (P + noise)``, ``P`` the pilot's power at that
    coefficient, ``noise`` the counts' variance per position; the mean is the counts' own."""
    y = np.asarray(counts, np.float64)
    level = y.mean()
    coef = fft.dctn(y - level, norm="ortho")
    power = fft.dctn(np.asarray(pilot, np.float64) - np.mean(pilot), norm="ortho") ** 2
    gain = power / np.maximum(power + max(noise, 0.0), 1e-300)
    return fft.idctn(gain * coef, norm="ortho") + level


WIENER_PROBES = 8  # Monte-Carlo probes of the divergences the Wiener blend's SURE needs (32 x 32 scan; fewer if larger)
WIENER_GUARD = 1.0  # standard errors by which SURE must prefer a weight over the even mean before it is taken
WIENER_EPS = 0.01  # size of the Monte-Carlo probes, in standard deviations of the counts


def _whole_rings(n: int, sectors: int, present: np.ndarray | None) -> list[slice]:
    """The rings whose every sector holds detector pixels (``present``), as slices of the region axis."""
    present = np.ones(n, bool) if present is None else np.asarray(present, bool)
    parts = (slice(r * sectors, (r + 1) * sectors) for r in range(n // sectors))
    return [p for p in parts if present[p].all()]


def _ring_harmonics(img: np.ndarray, rings: list[slice], basis: np.ndarray) -> np.ndarray:
    """``(H, W, rings, sectors)``: each ring's sector images taken apart by ``basis`` (:func:`sector_basis`)."""
    return np.stack([img[..., part] @ basis.T for part in rings], -2)


def _wiener_harmonics(raw_img: np.ndarray, fused: np.ndarray, rings: list[slice], basis: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(raw, fused, wiener)`` harmonics ``(H, W, rings, sectors)``: :func:`_ring_harmonics` of the raw and fused
    images, and the :func:`scan_wiener` of each raw harmonic with the fused one as its pilot (its variance: the
    squared weights times the sectors' mean counts)."""
    y, f = _ring_harmonics(raw_img, rings, basis), _ring_harmonics(fused, rings, basis)
    noise = _ring_harmonics(raw_img.mean(axis=(0, 1)), rings, basis ** 2)
    w = np.stack([np.stack([scan_wiener(y[..., i, k], f[..., i, k], float(noise[i, k])) for k in range(len(basis))], -1)
                  for i in range(len(rings))], -2)
    return y, f, w


def wiener_regions(raw_img: np.ndarray, fused: np.ndarray, sectors: int, present: np.ndarray | None = None,
                   blend: np.ndarray | float = 0.5) -> np.ndarray:
    """Region totals ``(H, W, n)``: per ring, each harmonic of its sectors (:func:`sector_basis`) becomes
    ``F + a (W - F)``, ``F`` the ``fused`` one, ``W`` the :func:`scan_wiener` of the raw counts' harmonic with
    ``F`` as the pilot, ``a`` the ``blend`` (one number, or one per whole ring and harmonic,
    :func:`wiener_blend`; 0.5: their mean). The Wiener alone passes the lattice frequencies that a Gaussian
    cuts, but it rebuilds every harmonic from the raw counts, dropping what the fusion took from the
    network: measured, the mean was never worse than the fusion on any image of ten stored runs at doses
    20 and 100, the Wiener alone up to 36% worse on the bright-field image (README, Quality: the Wiener
    step). A ring missing a sector (``present``: which regions hold detector pixels; a partial last ring on
    a small detector) keeps its fused totals."""
    basis = sector_basis(sectors)
    rings = _whole_rings(fused.shape[-1], sectors, present)
    out = np.array(fused, copy=True)
    if not rings:
        return out
    _, f, w = _wiener_harmonics(raw_img, fused, rings, basis)
    est = f + np.broadcast_to(np.asarray(blend, np.float64), f.shape[-2:]) * (w - f)
    for i, part in enumerate(rings):
        out[..., part] = est[..., i, :] @ basis
    return out


def wiener_blend(raw_img: np.ndarray, fused: np.ndarray, fuse, sectors: int, present: np.ndarray | None = None,
                 probes: int | None = None, seed: int = 0) -> np.ndarray:
    """The Wiener step's weight ``a`` per whole ring and harmonic ``(rings, sectors)``, in [0.5, 1]: SURE's
    minimiser of ``F + a (W - F)`` (:func:`wiener_regions`), taken only where SURE prefers it to the mean (0.5)
    by more than :data:`WIENER_GUARD` of that preference's standard error. ``fuse(raw_img)`` recomputes
    ``fused`` (the region totals before the step) from the region images: the divergences SURE needs go
    through the whole fusion and the data-driven pilot, so they are estimated by Monte Carlo (Ramani, Blu and
    Unser 2008): the counts moved by ``WIENER_EPS`` x their standard deviation along ``probes`` random
    directions, seeded. Never below the mean: SURE cannot see how much a trained network copied its own
    targets' noise (measured on Au [001] at doses 100-500: 14-48% of it in the region totals), which makes
    ``F`` look better than it is — there the truth's weight was still ~0.45 where SURE's was 0. Measured on
    15 stored runs, 18 networks (README, Quality: the Wiener step's weight by SURE): CoM and ADF errors down by
    up to 18%, one image worse (Si [110] dose 20's nearly flat bright field, in all three seeds)."""
    basis = sector_basis(sectors)
    rings = _whole_rings(fused.shape[-1], sectors, present)
    if not rings:
        return np.zeros((0, sectors))
    y, f, w = _wiener_harmonics(raw_img, fused, rings, basis)
    if probes is None:
        probes = int(np.clip(round(WIENER_PROBES * 1024 / max(raw_img[..., 0].size, 1)), 2, WIENER_PROBES))
    rng = np.random.default_rng(seed)
    sd = np.sqrt(np.maximum(raw_img, 0))
    div_f, div_w = np.zeros(f.shape[-2:]), np.zeros(f.shape[-2:])
    for _ in range(probes):  # E[(B b) . (B J b)] with b ~ N(0, diag(counts)): each harmonic's own weight x variance
        b = sd * rng.standard_normal(raw_img.shape)
        moved = raw_img + WIENER_EPS * b
        _, f2, w2 = _wiener_harmonics(moved, fuse(moved), rings, basis)
        bh = _ring_harmonics(b, rings, basis)
        div_f += (bh * (f2 - f)).sum((0, 1)) / (WIENER_EPS * probes)
        div_w += (bh * (w2 - w)).sum((0, 1)) / (WIENER_EPS * probes)
    d = w - f
    dd = (d * d).sum((0, 1))
    lin = (d * (f - y)).sum((0, 1)) + div_w - div_f  # SURE(F + a d) - SURE(F) = 2 a lin + a² dd
    best = np.clip(-lin / np.maximum(dd, 1e-300), 0.5, 1.0)
    gain = (lin + 0.25 * dd) - (2 * best * lin + best ** 2 * dd)  # SURE at the mean less SURE at the best
    var = _ring_harmonics(raw_img, rings, basis ** 2)  # each harmonic's variance at each position
    se = 2 * np.abs(best - 0.5) * np.sqrt((d * d * var).sum((0, 1)))
    return np.where((dd > 0) & (gain > WIENER_GUARD * se), best, 0.5)


def _split(raw_parts: np.ndarray, den_parts: np.ndarray, raw_whole: np.ndarray, den_whole: np.ndarray,
           fused_whole: np.ndarray, mean_share: np.ndarray) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Fused totals of the parts ``(H, W, k)`` of a whole: the whole's fused total split by the network's
    shares (or the mean pattern's, ``mean_share``), each part corrected by SURE's choice
    (:func:`split_choice`), the whole's total kept."""
    share = _shares(den_parts, den_whole[..., None], mean_share)
    fused = share * fused_whole[..., None]
    choices = []
    if raw_parts.shape[-1] > 1:
        for k in range(raw_parts.shape[-1]):
            candidates = {"network": share[..., k], "mean": np.float64(mean_share[k])}
            s, g, source = split_choice(raw_parts[..., k], candidates, raw_whole, fused_whole)
            choices.append((s, g, source))
            used = candidates[source]
            fused[..., k] = used * fused_whole + g * scan_smooth(raw_parts[..., k] - used * raw_whole, s)
        # the parts' corrections move counts between parts, never the whole's total
        fused -= share * (fused.sum(-1, keepdims=True) - fused_whole[..., None])
    return fused, choices


def top_down(raw_img: np.ndarray, den_img: np.ndarray, mean_totals: np.ndarray, sectors: int, halo: int = 1
             ) -> tuple[np.ndarray, dict]:
    """The fused region totals ``(H, W, n)`` from the raw and network region images, and SURE's choices: the
    whole pattern's total (:func:`stemdist.quality.sure.fusion_choice`; its mean where the raw total image
    varies no more than Poisson noise, ``FLAT_Z``), how it splits into rings, then how each ring splits into
    sectors (:func:`split_choice`, each level keeping the level above's totals). ``mean_totals``: the mean
    pattern's total in each region."""
    n = raw_img.shape[-1]
    ring_of = np.arange(n) // sectors
    rings = int(ring_of.max()) + 1

    def by_ring(a: np.ndarray) -> np.ndarray:
        return np.stack([a[..., ring_of == r].sum(-1) for r in range(rings)], -1)

    ring_raw, ring_den = by_ring(raw_img), by_ring(den_img)
    total_raw, total_den = ring_raw.sum(-1), ring_den.sum(-1)
    z = dispersion_z(total_raw)
    # no variation beyond Poisson noise: the candidates' risks differ by their noise alone. Far *below* it
    # (z < -FLAT_Z) the values are not Poisson counts (a gain-scaled cube): SURE decides, as everywhere else
    if abs(z) <= FLAT_Z:
        s1, s2, g, w = 0.0, 0.0, 0.0, 0.0
    else:
        s1, s2, g, w = fusion_choice(total_raw, total_den, halo=halo)
    a = scan_smooth(total_den, s1) if w else np.full_like(total_raw, total_raw.mean())  # the network, or the level
    total = a + g * scan_smooth(total_raw - a, s2)
    ring_mean = np.bincount(ring_of, weights=mean_totals, minlength=rings)
    ring_fused, ring_choices = _split(ring_raw, ring_den, total_raw, total_den, total,
                                      ring_mean / max(ring_mean.sum(), 1e-300))
    fused = np.empty_like(den_img)
    sector_choices = []
    for r in range(rings):
        part = np.flatnonzero(ring_of == r)
        fused[..., part], chosen = _split(raw_img[..., part], den_img[..., part], ring_raw[..., r], ring_den[..., r],
                                          ring_fused[..., r], mean_totals[part] / max(mean_totals[part].sum(), 1e-300))
        sector_choices += chosen
    return fused, {"total": (s1, s2, g, w), "total_z": z, "rings": ring_choices, "sectors": sector_choices}


def plan_regions(raw, den, mean: np.ndarray, sectors: int, share_cap: float, halo: int = 1, frame: int = 0,
                 wiener: bool = True) -> RegionPlan:
    """:func:`choose_regions` over the detector regions found from the mean pattern (the bright-field disk's
    centre and radius, :func:`stemdist.quality.metrics.find_masks`), ``sectors`` per ring."""
    masks = find_masks(mean)
    labels = detector_regions(tuple(raw.shape[2:]), masks.center, masks.bf_radius, sectors=sectors)
    return choose_regions(raw, den, labels, mean, sectors, share_cap, halo=halo, frame=frame, wiener=wiener)


def choose_regions(raw, den, labels: np.ndarray, mean: np.ndarray, sectors: int = 1, share_sigma: float = 0.0,
                   sample_chunks: int = SAMPLE_CHUNKS, halo: int = 1, frame: int = 0, wiener: bool = True
                   ) -> RegionPlan:
    """The :class:`RegionPlan` of ``raw`` (Zarr) and the network's ``den`` (Zarr or dask) for detector
    ``labels`` (``ring · sectors + sector``), top down: the whole pattern's total by SURE on the total-counts
    images (:func:`stemdist.quality.sure.fusion_choice`), how it splits into rings, then how each ring
    splits into sectors (:func:`split_choice`, each level keeping the level above's totals); then SURE
    over every pixel of up to ``sample_chunks`` scan chunks for the detail within sectors. The network's
    shares are smoothed by at most ``share_sigma`` (:func:`_choose_shares`;
    :func:`stemdist.run.final.fusion_plan` caps it at half the raw bright-field image's SURE width).
    ``halo``: the network's blind-spot window, as in ``model.halo``; ``frame``: positions at the scan's
    edge whose "network" patterns are the counts copied through (``data.borders: copy``), left out of
    the share width's score and given no radial gain (:func:`_choose_gain`). ``wiener``: the sectors' totals
    then filtered by :func:`wiener_regions`."""
    raw_img, den_img, den_mean = region_images(raw, den, labels, den_mean=True)
    n = raw_img.shape[-1]
    mean_totals = np.bincount(labels.ravel(), weights=np.asarray(mean, np.float64).ravel(), minlength=n)
    fused, choices = top_down(raw_img, den_img, mean_totals, sectors, halo)
    choices["wiener"] = None
    if wiener:
        present = np.bincount(labels.ravel(), minlength=n) > 0
        blend = wiener_blend(raw_img, fused, lambda y: top_down(y, den_img, mean_totals, sectors, halo)[0],
                             sectors, present)
        fused = wiener_regions(raw_img, fused, sectors, present, blend)
        choices["wiener"] = blend.round(3).tolist()
    pixel_share = _shares(np.asarray(mean, np.float64), mean_totals[labels], 0.0)
    plan = RegionPlan(labels, pixel_share.astype(np.float32), (fused - den_img).astype(np.float32), 0.0,
                      0.0, 0.0, 0.0, choices)
    # with a frame (data.borders: copy) the "network" there is the counts copied through: not reshaped
    choices["share_gain"] = 0.0
    if not frame:
        ring = detector_rings(np.shape(mean), find_masks(mean).center)
        gain = radial_gain(mean, den_mean, ring)
        choices["share_gain"] = alpha = _choose_gain(raw, den, plan, sample_chunks, gain, ring, mean)
        plan = replace(plan, share_gain=(gain ** alpha).astype(np.float32) if alpha else None)
    plan = replace(plan, share_sigma=_choose_shares(raw, den, plan, sample_chunks, share_sigma, frame))
    detail_sigma, detector_sigma, gain = _choose_detail(raw, den, plan, sample_chunks)
    return replace(plan, detail_sigma=detail_sigma, detector_sigma=detector_sigma, detail_gain=gain)


def _sample(raw, den, grid: Grid, t: int, halo: int):
    """Scan chunk ``t`` with ``halo`` positions around it: ``(y, lam, inner, (y0, y1, x0, x1), (ya, xa))``:
    counts, network, the chunk inside the block, its bounds and the block's corner."""
    H, W = raw.shape[:2]
    y0, y1, x0, x1 = grid.bounds(int(t))
    ya, yb, xa, xb = max(y0 - halo, 0), min(y1 + halo, H), max(x0 - halo, 0), min(x1 + halo, W)
    y = _region(raw, slice(ya, yb), slice(xa, xb)).astype(np.float32)
    lam = _region(den, slice(ya, yb), slice(xa, xb)).astype(np.float32)
    return y, lam, (slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa)), (y0, y1, x0, x1), (ya, xa)


def _summed(score, raw, den, sample_chunks: int, halo: int) -> np.ndarray:
    """``score(sample)`` (an array) summed over up to ``sample_chunks`` scan chunks spread over the scan, each
    read with ``halo`` positions around it (:func:`_sample`). Chunks are scored up to :func:`chunk_threads` at once
    (NumPy and SciPy release the GIL), fewer where their blocks would hold more than :data:`PLAN_BYTES`, and
    summed in their order, so the sum does not depend on the threads."""
    grid = Grid.of(raw)
    picks = sorted(set(np.linspace(0, grid.n_tiles - 1, min(sample_chunks, grid.n_tiles)).round().astype(int)))
    block = (min(grid.ty + 2 * halo, grid.H) * min(grid.tx + 2 * halo, grid.W)
             * int(np.prod(raw.shape[2:])) * 4)  # float32 bytes of one block with its halo
    threads = max(1, min(chunk_threads(), int(PLAN_BYTES // (PLAN_COPIES * block))))
    with ThreadPoolExecutor(threads) as pool:
        scores = list(pool.map(lambda t: np.asarray(score(_sample(raw, den, grid, t, halo)), np.float64), picks))
    total = np.zeros_like(scores[0])
    for x in scores:
        total += x
    return total


def chunk_threads() -> int:
    """Threads for the fusion's chunks: up to 4 of this process's CPUs (each holds a block and its halo)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(4, cpus))


def _choose_shares(raw, den, plan: RegionPlan, sample_chunks: int, cap: float, frame: int = 0) -> float:
    """The scan width of the network's shares, at most ``cap``: the one among :data:`SHARE_SIGMAS` below
    ``cap``, and ``cap``, minimising SURE of ``spread(den) · fused totals`` over every pixel of sampled
    chunks, the network's dependence on its neighbours' counts left out. Each alone was measured worse: the
    cap alone (half the raw bright-field SURE width) smoothed Si [110]'s good shares over 2 positions
    (-2.4 dB at dose 100); SURE alone chose 1 on SrTiO3 where 0.5 (under the cap) was best, and 1 where
    MoS2's noisy shares wanted 4 (the cap, 2, came closer). Positions within ``frame`` of the scan's edge
    are not scored."""
    widths = sorted({s for s in SHARE_SIGMAS if s < cap} | {float(cap)})
    if len(widths) == 1:
        return widths[0]
    H, W = raw.shape[:2]

    def score(sample) -> list[float]:
        y, lam, inner, (y0, y1, x0, x1), (ya, xa) = sample
        totals = plan.expand(np.maximum(plan.fused_totals(lam, ya, xa), 0)[inner])
        yi, own = y[inner], plan.spread(lam)  # plan.share_sigma is 0 here: the shares as they are
        yy, xx = np.mgrid[y0:y1, x0:x1]
        scored = ((yy >= frame) & (yy < H - frame) & (xx >= frame) & (xx < W - frame))[..., None, None]
        return [float((((scan_smooth_at(own, s, *inner) * totals - yi) ** 2) * scored).sum(dtype=np.float64))
                for s in widths]

    risks = _summed(score, raw, den, sample_chunks, math.ceil(TRUNCATE * max(widths)))
    return float(widths[int(np.argmin(risks))])


GAIN_POWERS = (0.0, 0.5, 1.0)  # powers of the radial gain tried for the network's shares (0: the network's own)


def _choose_gain(raw, den, plan: RegionPlan, sample_chunks: int, gain: np.ndarray, ring: np.ndarray,
                 mean: np.ndarray) -> float:
    """The power ``a`` of the :func:`radial_gain` by which the network's pattern is multiplied before its shares
    are taken (:data:`GAIN_POWERS`), minimising SURE of ``spread(den · gain**a) · fused totals`` over every
    pixel of sampled chunks (the shares not smoothed over the scan). Only the detail within regions changes:
    the region totals are the fused ones. The gain is fitted to the counts of the whole scan, so SURE charges
    its divergence: ``gain_b`` moves by ``a gain_b / Y_b`` per count in ring ``b`` (``Y_b`` the scan's counts in
    that ring), and a pixel's share then by ``a · share (1 − S) / Y_b``, ``S`` the share of its region that
    lies in its ring. The network trained on these counts makes its own shares look a little better than
    they are (README, Quality: the shares' radial gain). Not tried with a frame of copied counts
    (``data.borders: copy``), whose "network" patterns are the counts themselves."""
    H, W = raw.shape[:2]
    ring_counts = np.bincount(ring.ravel(), np.asarray(mean, np.float64).ravel()) * H * W  # Y_b
    inv_y = np.where(ring_counts > 0, 1 / np.maximum(ring_counts, 1e-300), 0.0)[ring].astype(np.float32)
    _, part = np.unique(plan.labels * (ring.max() + 1) + ring, return_inverse=True)  # (region, ring) of each pixel
    part = part.ravel()
    member = sparse.csr_matrix((np.ones(part.size, np.float32), (np.arange(part.size), part)))  # pixel -> part

    def score(sample) -> list[float]:
        y, lam, _, _, (ya, xa) = sample
        totals = plan.expand(np.maximum(plan.fused_totals(lam, ya, xa), 0))
        risks = []
        for a in GAIN_POWERS:
            share = replace(plan, share_gain=(gain ** a).astype(np.float32)).spread(lam)
            flat = share.reshape(-1, part.size)
            inside = np.asarray(member.T.dot(flat.T).T)[:, part].reshape(share.shape)  # S
            div = a * share * (1 - inside) * inv_y * totals * y
            risks.append(float(((share * totals - y) ** 2 + 2 * div).sum(dtype=np.float64)))
        return risks

    risks = _summed(score, raw, den, sample_chunks, 0)  # no halo: the whole block is scored
    return float(GAIN_POWERS[int(np.argmin(risks))])


def _choose_detail(raw, den, plan: RegionPlan, sample_chunks: int) -> tuple[float, float, float]:
    """``(detail_sigma, detector_sigma, gain)`` minimising SURE over every pixel of sampled chunks.

    Exact for this linear correction where the network's shares are not smoothed (they do not depend on a
    position's own counts); smoothed, their dependence on the neighbours' counts is left out."""
    halo = math.ceil(TRUNCATE * plan.share_sigma) + math.ceil(TRUNCATE * max(DETAIL_SIGMAS))
    H, W = raw.shape[:2]
    cands = [(s, d) for d in DETAIL_DETECTOR for s in DETAIL_SIGMAS]
    # the scan Gaussian's weight on each position itself: larger near the scan's edges (reflected there)
    own_scan = {s: own_weights((H, W), s) for s in DETAIL_SIGMAS}

    def score(sample) -> np.ndarray:  # per candidate: <a, b>, |a|², the correction's weight on own counts x counts
        y, lam, inner, (y0, y1, x0, x1), (ya, xa) = sample
        stats = np.zeros((len(cands), 3))
        share = plan.spread(lam)
        yi, si = y[inner], share[inner]
        b = si * plan.expand(np.maximum(plan.fused_totals(lam, ya, xa), 0)[inner]) - yi
        for d in DETAIL_DETECTOR:
            detail = plan.detail(y, share, d)
            own_d = plan.detail_own(si, d)  # per position: the centre alone
            for s in DETAIL_SIGMAS:
                corr = scan_smooth_at(detail, s, *inner)
                own_s = own_scan[s][y0:y1, x0:x1, None, None]
                stats[cands.index((s, d))] = (float((corr * b).sum(dtype=np.float64)),
                                              float((corr * corr).sum(dtype=np.float64)),
                                              float((own_s * own_d * yi).sum(dtype=np.float64)))
        return stats

    stats = _summed(score, raw, den, sample_chunks, halo)
    # SURE(g) = 2 g (<a, b> + own) + g² |a|² + terms that do not depend on the candidate
    best = (0.0, 0.0, 0.0, 0.0)
    for (s, d), (ab, aa, own) in zip(cands, stats, strict=True):
        g = float(np.clip(-(ab + own) / aa, 0, 1)) if aa > 0 else 0.0
        risk = 2 * g * (ab + own) + g * g * aa
        if risk < best[3]:
            best = (s, d, g, risk)
    return best[:3]


def _detector_smooth(arr: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(arr, (0, 0, sigma, sigma), truncate=TRUNCATE, mode="reflect")


def fuse_block(raw: np.ndarray, den: np.ndarray, plan: Plan | RegionPlan | float,
               detector_sigma: float = 1.0) -> np.ndarray:
    """The fused estimate of a whole cube held in memory (float32, clipped at 0); a number for ``plan`` is
    :class:`Plan`'s width. The inputs are left as they are."""
    if not isinstance(plan, Plan | RegionPlan):
        plan = Plan(float(plan), detector_sigma)
    return plan.apply(raw, den)


def _region(arr, ys: slice, xs: slice) -> np.ndarray:
    """``arr[ys, xs]`` as a numpy array (a Zarr array, or a dask array computed in this thread)."""
    part = arr[ys, xs]
    return part.compute(scheduler="synchronous") if isinstance(part, da.Array) else np.asarray(part)


def fuse_chunk(raw, den, out: zarr.Array, cy: int, cx: int, plan: Plan | RegionPlan) -> None:
    """Write scan chunk ``(cy, cx)`` of ``out``: the fused estimate of its positions, computed from the
    chunk plus a halo deep enough that the result equals fusing the whole cube at once."""
    H, W = out.shape[:2]
    ty, tx = out.chunks[:2]
    y0, y1, x0, x1 = cy * ty, min((cy + 1) * ty, H), cx * tx, min((cx + 1) * tx, W)
    h = plan.depth()
    ya, yb, xa, xb = max(y0 - h, 0), min(y1 + h, H), max(x0 - h, 0), min(x1 + h, W)
    ys, xs = slice(ya, yb), slice(xa, xb)
    out[y0:y1, x0:x1] = plan.apply(_region(raw, ys, xs), _region(den, ys, xs), ya, xa,
                                   inner=(slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa)))


def fuse_into(out: zarr.Array, raw, den, plan: Plan | RegionPlan | float, detector_sigma: float = 1.0, *,
              chunks: range | None = None, threads: int | None = None, progress=None) -> None:
    """Write the fused estimate of ``raw`` (Zarr) and ``den`` (Zarr or dask) into ``out``, chunk by chunk
    (``chunks``: which ones, in raster order over the scan; all by default). A number for ``plan`` is
    :class:`Plan`'s width (0 copies ``den``).

    Each output chunk is computed from its own region plus a halo and written at once, ``threads``
    chunks at a time and as many waiting (SciPy's filters release the GIL; default: up to 4 of this
    process's CPUs): memory is a few blocks, whatever the cube's size.
    """
    if tuple(raw.shape) != tuple(den.shape) or tuple(out.shape) != tuple(raw.shape):
        raise ValueError(f"fuse: raw {raw.shape}, denoised {den.shape} and output {out.shape} differ in shape")
    if not isinstance(plan, Plan | RegionPlan):
        plan = Plan(float(plan), detector_sigma)
    grid = Grid.of(out)
    nx = grid.shape[1]
    if chunks is None:
        chunks = range(grid.n_tiles)
    if threads is None:
        threads = chunk_threads()
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for t in chunks:
            pending.append(pool.submit(fuse_chunk, raw, den, out, t // nx, t % nx, plan))
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
