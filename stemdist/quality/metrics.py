"""Quality metrics against a known truth, computed out of core (dask, chunk by chunk).

Definitions (also written into ``metrics.json`` by ``stemdist evaluate``):

- ``psnr``: ``10 log10(L**2 / MSE)`` in dB, with ``MSE`` the mean squared error over the whole cube
  and ``L`` the data range, the global maximum of the truth cube (expected counts).
  ``psnr_interior`` is the same over the positions that are not on the scan's border.
- ``ssim``: structural similarity of every 2-D pattern with its true pattern (Wang et al. 2004:
  Gaussian window sigma 1.5 px truncated at 3.5 sigma, K1 = 0.01, K2 = 0.03, the same data range
  ``L``, a 5-pixel detector border left out), averaged over the pixels of a pattern, then over patterns.
- ``rel_rmse``: ``||estimate - truth|| / ||truth||`` over the whole cube.
- virtual images (one value per probe position): ``bf`` (counts inside the bright-field disk),
  ``adf`` (counts inside the annular dark-field ring), ``com_y`` / ``com_x`` (centre of mass of the
  whole pattern, in detector pixels from the disk centre). Their errors ``bf_err`` ... are
  ``||v_est - v_true|| / ||v_true - mean(v_true)||``: the error relative to the image's own contrast
  (1.0 means an error as large as the contrast to be seen; 0 is perfect).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import dask.array as da
import numpy as np
import zarr
from scipy import ndimage

VIRTUAL = ("bf", "adf", "com_y", "com_x")
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
SSIM_PAD = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # half the Gaussian window: 5 px

DEFINITIONS = {
    "psnr": "10*log10(L^2 / MSE) dB; MSE over the whole cube, L = global max of the truth (data range)",
    "psnr_interior": "psnr over the probe positions off the scan border",
    "ssim": "per-pattern SSIM (Gaussian window sigma 1.5 px, K1 0.01, K2 0.03, data range L, 5 px detector "
            "border excluded), mean over patterns",
    "rel_rmse": "||est - truth|| / ||truth|| over the whole cube",
    "bf": "virtual bright-field: counts inside the bright-field disk",
    "adf": "virtual annular dark-field: counts inside the ADF ring",
    "com_y, com_x": "centre of mass of each whole pattern, detector pixels from the disk centre",
    "*_err": "relative error of a virtual image: ||v_est - v_true|| / ||v_true - mean(v_true)||",
    "bf_mean, adf_mean": "bias: mean of the virtual image / the truth's (1 = the right counts on average)",
    "bf_contrast, adf_contrast": "bias: standard deviation of the virtual image / the truth's (1 = the right "
                                 "contrast; noise raises it, over-smoothing lowers it)",
}


def _lazy(arr: zarr.Array | da.Array | np.ndarray) -> da.Array:
    if isinstance(arr, da.Array):
        return arr
    if isinstance(arr, zarr.Array):
        return da.from_zarr(arr)
    return da.from_array(np.asarray(arr))


def relative_rmse(estimate, truth) -> float:
    """``||estimate - truth|| / ||truth||`` over the whole cube."""
    e, t = _lazy(estimate).astype(np.float64), _lazy(truth).astype(np.float64)
    num, den = da.compute(((e - t) ** 2).sum(), (t**2).sum())
    return float(np.sqrt(num / den))


def psnr(estimate: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    """PSNR in dB of in-memory arrays; ``data_range`` defaults to ``truth.max()``."""
    e, t = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    L = float(t.max()) if data_range is None else float(data_range)
    mse = float(np.mean((e - t) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(L**2 / mse)


def ssim_patterns(estimate: np.ndarray, truth: np.ndarray, data_range: float) -> np.ndarray:
    """SSIM of each 2-D pattern of ``(..., P, Q)`` arrays with its true pattern; shape ``(...)``."""
    e = np.asarray(estimate, np.float64)
    t = np.asarray(truth, np.float64)
    lead = e.shape[:-2]
    e = e.reshape((-1,) + e.shape[-2:])
    t = t.reshape((-1,) + t.shape[-2:])
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2

    def filt(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=(0, SSIM_SIGMA, SSIM_SIGMA), truncate=SSIM_TRUNCATE,
                                       mode="reflect")

    mu_e, mu_t = filt(e), filt(t)
    var_e = filt(e * e) - mu_e**2
    var_t = filt(t * t) - mu_t**2
    cov = filt(e * t) - mu_e * mu_t
    s = ((2 * mu_e * mu_t + c1) * (2 * cov + c2)) / ((mu_e**2 + mu_t**2 + c1) * (var_e + var_t + c2))
    P, Q = s.shape[1:]
    p = SSIM_PAD if min(P, Q) > 2 * SSIM_PAD else 0
    s = s[:, p:P - p, p:Q - p]
    return s.mean(axis=(1, 2)).reshape(lead)


# --- detector masks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Masks:
    """Bright-field disk and ADF ring on the detector, in pixels (centre as (y, x))."""

    center: tuple[float, float]
    bf_radius: float
    adf_inner: float
    adf_outer: float

    def radius_map(self, shape: tuple[int, int]) -> np.ndarray:
        ky, kx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        return np.hypot(ky - self.center[0], kx - self.center[1])

    def bf(self, shape: tuple[int, int]) -> np.ndarray:
        return (self.radius_map(shape) <= self.bf_radius).astype(np.float64)

    def adf(self, shape: tuple[int, int]) -> np.ndarray:
        r = self.radius_map(shape)
        return ((r >= self.adf_inner) & (r < self.adf_outer)).astype(np.float64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["center"] = [float(c) for c in self.center]
        return {k: (round(v, 3) if isinstance(v, float) else [round(c, 3) for c in v]) for k, v in d.items()}


def find_masks(mean_pattern: np.ndarray, threshold: float = 0.5, center: tuple[float, float] | None = None,
               bf_radius: float | None = None, adf_inner: float | None = None,
               adf_outer: float | None = None, inner_factor: float = 1.2, outer_factor: float = 3.0) -> Masks:
    """Masks from the mean pattern: the disk is where it exceeds ``threshold`` x its maximum.

    The centre is the centroid of the disk pixels, the radius ``sqrt(area / pi)``; the ADF ring spans
    ``inner_factor``-``outer_factor`` x that radius. Any of them can be given instead.
    """
    m = np.asarray(mean_pattern, np.float64)
    disk = m >= threshold * m.max() if m.max() > 0 else np.ones_like(m, bool)
    if center is None:
        ys, xs = np.nonzero(disk)
        center = (float(ys.mean()), float(xs.mean()))
    if bf_radius is None:
        bf_radius = float(np.sqrt(disk.sum() / np.pi))
    adf_inner = inner_factor * bf_radius if adf_inner is None else float(adf_inner)
    adf_outer = outer_factor * bf_radius if adf_outer is None else float(adf_outer)
    if not adf_outer > adf_inner:
        raise ValueError(f"ADF ring: outer radius {adf_outer} must exceed inner radius {adf_inner}")
    return Masks((float(center[0]), float(center[1])), float(bf_radius), float(adf_inner), float(adf_outer))


def mean_pattern(arr, max_chunks: int | None = None) -> np.ndarray:
    """Mean pattern of a cube, streamed; with ``max_chunks``, from that many scan chunks spread evenly."""
    d = _lazy(arr)
    if max_chunks is not None:
        ny, nx = len(d.chunks[0]), len(d.chunks[1])
        if ny * nx > max_chunks:
            picks = sorted(set(np.linspace(0, ny * nx - 1, max_chunks).round().astype(int).tolist()))
            ys = np.cumsum((0,) + d.chunks[0])
            xs = np.cumsum((0,) + d.chunks[1])
            blocks = [d[ys[i // nx]:ys[i // nx + 1], xs[i % nx]:xs[i % nx + 1]] for i in picks]
            parts = [b.astype(np.float64).sum(axis=(0, 1)) for b in blocks]
            return np.sum(da.compute(*parts), axis=0) / sum(b.shape[0] * b.shape[1] for b in blocks)
    return d.astype(np.float64).mean(axis=(0, 1)).compute()


# --- virtual images and per-position statistics, one pass over the chunks -----------------------


def _virtual_block(block: np.ndarray, bf: np.ndarray, adf: np.ndarray, ky: np.ndarray,
                   kx: np.ndarray) -> np.ndarray:
    b = np.asarray(block, np.float64)
    total = b.sum(axis=(-2, -1))
    safe = np.where(total > 0, total, 1.0)
    out = np.stack([np.tensordot(b, bf, 2), np.tensordot(b, adf, 2),
                    np.where(total > 0, np.tensordot(b, ky, 2) / safe, 0.0),
                    np.where(total > 0, np.tensordot(b, kx, 2) / safe, 0.0)], axis=-1)
    return out


def _detector_maps(masks: Masks, shape: tuple[int, int]):
    ky, kx = np.meshgrid(np.arange(shape[0], dtype=np.float64) - masks.center[0],
                         np.arange(shape[1], dtype=np.float64) - masks.center[1], indexing="ij")
    return masks.bf(shape), masks.adf(shape), ky, kx


def virtual_images_lazy(arr, masks: Masks) -> da.Array:
    """Lazy ``(H, W, 4)`` stack of the virtual images bf, adf, com_y, com_x."""
    d = _lazy(arr)
    d = d.rechunk({2: -1, 3: -1})
    maps = _detector_maps(masks, d.shape[2:])
    return d.map_blocks(_virtual_block, *maps, drop_axis=[2, 3], new_axis=[2],
                        chunks=d.chunks[:2] + ((4,),), dtype=np.float64)


def virtual_images(arr, masks: Masks) -> dict[str, np.ndarray]:
    """Virtual BF, ADF and centre-of-mass images of a cube, streamed."""
    v = virtual_images_lazy(arr, masks).compute()
    return {k: v[..., i] for i, k in enumerate(VIRTUAL)}


PAIR = ("sse", "tsq", "ssim")


def _pair_block(est: np.ndarray, truth: np.ndarray, data_range: float, bf, adf, ky, kx) -> np.ndarray:
    e = np.asarray(est, np.float64)
    t = np.asarray(truth, np.float64)
    sse = ((e - t) ** 2).sum(axis=(-2, -1))
    tsq = (t**2).sum(axis=(-2, -1))
    s = ssim_patterns(e, t, data_range)
    return np.concatenate([np.stack([sse, tsq, s], axis=-1), _virtual_block(e, bf, adf, ky, kx)], axis=-1)


def position_stats_lazy(estimate, truth, masks: Masks, data_range: float) -> da.Array:
    """Lazy ``(H, W, 7)``: per position sse, sum of truth², SSIM, then the estimate's virtual images."""
    t = _lazy(truth).rechunk({2: -1, 3: -1})
    e = _lazy(estimate).rechunk(t.chunks)
    maps = _detector_maps(masks, t.shape[2:])
    return da.map_blocks(_pair_block, e, t, data_range, *maps, drop_axis=[2, 3], new_axis=[2],
                         chunks=t.chunks[:2] + ((len(PAIR) + len(VIRTUAL),),), dtype=np.float64)


def relative_image_error(v_est: np.ndarray, v_true: np.ndarray) -> float:
    """``||v_est - v_true|| / ||v_true - mean(v_true)||`` (inf when the true image is flat)."""
    num = float(np.linalg.norm(np.asarray(v_est, np.float64) - v_true))
    den = float(np.linalg.norm(v_true - np.mean(v_true)))
    return num / den if den > 0 else float("inf")


def summarise(stats: np.ndarray, truth_virtual: np.ndarray, data_range: float, n_pixels: int) -> dict:
    """Metrics from the per-position stats of an estimate and the truth's virtual images."""
    sse, tsq, ssim = stats[..., 0], stats[..., 1], stats[..., 2]
    virt = stats[..., 3:]
    H, W = sse.shape
    mse = sse.sum() / (H * W * n_pixels)
    inner = sse[1:-1, 1:-1]
    mse_in = inner.sum() / (inner.size * n_pixels) if inner.size else float("nan")

    def db(m: float) -> float:
        return float(10 * np.log10(data_range**2 / m)) if m > 0 else float("inf")

    out = {"psnr": db(mse), "psnr_interior": db(mse_in), "ssim": float(ssim.mean()),
           "rel_rmse": float(np.sqrt(sse.sum() / tsq.sum()))}
    for i, k in enumerate(VIRTUAL):
        out[f"{k}_err"] = relative_image_error(virt[..., i], truth_virtual[..., i])
    for i, k in enumerate(VIRTUAL[:2]):  # counts images: is the estimate biased (mean, contrast)?
        t = truth_virtual[..., i]
        out[f"{k}_mean"] = float(virt[..., i].mean() / t.mean()) if t.mean() else float("nan")
        out[f"{k}_contrast"] = float(virt[..., i].std() / t.std()) if t.std() else float("nan")
    return out


def blind_spot_reference(truth_virtual: np.ndarray, halo: int = 1) -> dict[str, float]:
    """What averaging the neighbours' *true* patterns gives — a blind-spot network's reference, since it
    never sees the centre: the BF and ADF images of the truth's neighbour mean over the window (``2 halo + 1``
    square, mirrored at the scan's edges as the data path), as contrast (std / the truth's) and error
    (relative to the truth's contrast). A network below these contrasts is short of what its input holds."""
    w = 2 * halo + 1
    kernel = np.ones((w, w))
    kernel[halo, halo] = 0
    kernel /= kernel.sum()
    out = {}
    for i, name in enumerate(VIRTUAL[:2]):
        t = np.asarray(truth_virtual[..., i], np.float64)
        nb = ndimage.convolve(t, kernel, mode="mirror")
        out[f"{name}_contrast"] = float(nb.std() / t.std()) if t.std() else float("nan")
        out[f"{name}_err"] = relative_image_error(nb, t)
    return out


def evaluate_cubes(estimates: dict[str, object], truth, masks: Masks, data_range: float | None = None
                   ) -> tuple[dict[str, dict], dict[str, np.ndarray], np.ndarray, float]:
    """Metrics of several estimates against one truth in a single streamed pass.

    Returns ``(metrics per name, virtual images (H, W, 4) per name, the truth's, data range)``.
    """
    t = _lazy(truth)
    if data_range is None:
        data_range = float(t.max().compute())
    lazy = [virtual_images_lazy(t, masks)] + [position_stats_lazy(e, t, masks, data_range)
                                               for e in estimates.values()]
    results = da.compute(*lazy)
    tv = results[0]
    n_pixels = int(t.shape[2] * t.shape[3])
    metrics, virtual = {}, {}
    for name, stats in zip(estimates, results[1:], strict=True):
        metrics[name] = summarise(stats, tv, data_range, n_pixels)
        virtual[name] = stats[..., 3:]
    return metrics, virtual, tv, data_range


def bright_field_mask(arr: zarr.Array) -> np.ndarray:
    """The bright-field disk (0/1 over the detector) of the mean pattern of up to 16 sampled chunks."""
    return find_masks(mean_pattern(arr, max_chunks=16)).bf(arr.shape[2:])


def virtual_bf_lazy(arr: zarr.Array | da.Array, mask: np.ndarray | None = None) -> da.Array:
    """Counts inside the bright-field ``mask`` of every pattern (the whole detector without one), lazily."""
    darr = (arr if isinstance(arr, da.Array) else da.from_zarr(arr)).astype(np.float64)
    if mask is None:
        return darr.sum(axis=(2, 3))
    return da.tensordot(darr, np.asarray(mask, np.float64), axes=([2, 3], [0, 1]))


def virtual_bf(arr: zarr.Array | da.Array, mask: np.ndarray | None = None) -> np.ndarray:
    """The virtual bright-field image, streamed."""
    return virtual_bf_lazy(arr, mask).compute()
