"""Figures people look at: virtual images of raw vs denoised (vs a high-dose reference)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402


def bright_field_mask(arr: zarr.Array) -> np.ndarray:
    """The bright-field disk (0/1 over the detector) of the mean pattern of up to 16 sampled chunks."""
    from .metrics import find_masks, mean_pattern

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


def image_panels(path: str | Path, panels: dict[str, np.ndarray], title: str = "") -> Path:
    """One row of images with a shared colour scale per image, each with its own colour bar."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels.items(), strict=True):
        im = ax.imshow(img, cmap="gray")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def denoised_figure(path: str | Path, raw_bf: np.ndarray, denoised: zarr.Array, mask: np.ndarray,
                    reference: zarr.Array | da.Array | None = None) -> Path:
    """``denoised.png``: virtual bright-field of raw (given), denoised and (when given) the high-dose reference."""
    panels = {"raw": raw_bf, "denoised": virtual_bf(denoised, mask)}
    if reference is not None:
        panels["high-dose reference"] = virtual_bf(reference, mask)
    radius = np.sqrt(mask.sum() / np.pi)
    return image_panels(path, panels, f"virtual bright-field (counts in the central disk, r = {radius:.1f} px)")


def cycle_figure(path: str | Path, cycle: int, raw_bf: np.ndarray, bf: np.ndarray,
                 tensorboard_dir: str | Path | None = None) -> Path:
    """Virtual bright-field of raw vs one cycle's output; also sent to TensorBoard when it is installed."""
    title = f"virtual bright-field (central disk) after cycle {cycle}"
    image_panels(path, {"raw": raw_bf, f"cycle {cycle}": bf}, title)
    if tensorboard_dir is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return Path(path)
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
        for ax, (name, img) in zip(axes, (("raw", raw_bf), (f"cycle {cycle}", bf)), strict=True):
            ax.imshow(img, cmap="gray")
            ax.set_title(name)
            ax.axis("off")
        with SummaryWriter(str(tensorboard_dir)) as writer:
            writer.add_figure("virtual_bright_field", fig, global_step=cycle)
        plt.close(fig)
    return Path(path)
