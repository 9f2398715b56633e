"""Figures of a run and of its evaluation: ``denoised.png``, per-cycle images, and ``RUN_DIR/report/``.

- ``virtual_images.png``: virtual BF, ADF and centre-of-mass (y, x) maps, one column per cube
  (raw, denoised, baselines, reference), one colour scale per row;
- ``patterns.png``: patterns at a few probe positions on a log scale;
- ``loss.png``: the training loss of every epoch across the cycles;
- ``metrics_per_cycle.png`` (``evaluate`` with a truth): PSNR, SSIM and virtual-image errors per cycle.

``run_figures`` draws the first three at the end of every ``denoise`` run from the cubes already written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

from ..layout import REPORT, read_losses  # noqa: E402
from .metrics import VIRTUAL, Masks, find_masks, mean_pattern, virtual_bf, virtual_images_lazy  # noqa: E402

log = logging.getLogger("stemdist")

ROW_TITLES = {"bf": "virtual BF", "adf": "virtual ADF", "com_y": "CoM y (px)", "com_x": "CoM x (px)"}


def report_dir(root: str | Path) -> Path:
    out = Path(root) / REPORT
    out.mkdir(parents=True, exist_ok=True)
    return out


def _limits(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1e-12
    return float(lo), float(hi)


def virtual_figure(path: str | Path, images: dict[str, np.ndarray], scale_from: str | None = None,
                   masks: Masks | None = None) -> Path:
    """Rows BF / ADF / CoM y / CoM x, one column per ``(H, W, 4)`` stack in ``images``.

    Each row shares the colour scale of column ``scale_from`` (default: the last column), so a noisy
    column saturates rather than hiding the others' contrast.
    """
    names = list(images)
    ref = scale_from if scale_from in images else names[-1]
    n = len(names)
    H, W = images[ref].shape[:2]
    cell = 2.6
    fig, axes = plt.subplots(len(VIRTUAL), n, figsize=(cell * n + 0.8, cell * len(VIRTUAL) * max(0.5, H / W)),
                             squeeze=False)
    for r, key in enumerate(VIRTUAL):
        lo, hi = _limits(images[ref][..., r])
        cmap = "gray" if key in ("bf", "adf") else "RdBu_r"
        for c, name in enumerate(names):
            ax = axes[r][c]
            im = ax.imshow(images[name][..., r], cmap=cmap, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(ROW_TITLES[key])
        fig.colorbar(im, ax=list(axes[r]), fraction=0.02, pad=0.01)
    title = "virtual images"
    if masks is not None:
        title += (f" (BF disk r={masks.bf_radius:.1f} px, "
                  f"ADF {masks.adf_inner:.1f}-{masks.adf_outer:.1f} px, "
                  f"centre {masks.center[0]:.1f}, {masks.center[1]:.1f})")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def example_positions(H: int, W: int) -> list[tuple[int, int]]:
    """A few probe positions: the centre, one off-centre, and a border corner."""
    pos = [(H // 2, W // 2), (H // 4, (3 * W) // 4), (0, 0)]
    return list(dict.fromkeys(pos))


def patterns_figure(path: str | Path, cubes: dict[str, object], positions: list[tuple[int, int]]) -> Path:
    """Patterns of every cube at ``positions`` on a log scale; one colour scale per position.

    The scale spans three decades below the brightest pixel of the last cube (the reference, or the
    denoised cube), so single counts in a raw pattern and the faint dark-field signal both show.
    """
    names = list(cubes)
    pats = {name: [np.clip(np.asarray(cubes[name][y, x], np.float64), 0, None) for y, x in positions]
            for name in names}
    size = (2.6 * len(names) + 0.8, 2.6 * len(positions))
    fig, axes = plt.subplots(len(positions), len(names), figsize=size, squeeze=False)
    for r, (y, x) in enumerate(positions):
        hi = float(pats[names[-1]][r].max()) or max(float(pats[n][r].max()) for n in names) or 1.0
        floor = hi * 1e-3
        for c, name in enumerate(names):
            ax = axes[r][c]
            im = ax.imshow(np.log10(pats[name][r] + floor), cmap="magma", vmin=np.log10(floor),
                           vmax=np.log10(hi + floor))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"position ({y}, {x})")
        fig.colorbar(im, ax=list(axes[r]), fraction=0.02, pad=0.01)
    fig.suptitle("patterns, log10(counts + 1e-3 x max)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def loss_figure(path: str | Path, root: str | Path) -> Path | None:
    """Epoch loss across cycles and ensemble members (warm-up epochs, a z-normalised MSE, on their own axis),
    and the Poisson loss on the held-out positions (``train.holdout``) where it was logged."""
    rows = read_losses(root)
    for r in rows:
        r["warmup"] = r["phase"] == "warmup"
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax2 = None
    x = 0
    for cycle, member in sorted({(r["cycle"], r["member"]) for r in rows}):  # each ensemble member on its own
        rs = sorted((r for r in rows if (r["cycle"], r["member"]) == (cycle, member)), key=lambda r: r["epoch"])
        xs = np.arange(x, x + len(rs))
        warm = np.array([r["warmup"] for r in rs])
        loss = np.array([r["loss"] for r in rs])
        held = np.array([r.get("heldout", np.nan) for r in rs], dtype=float)
        first = (cycle, member) == (rows[0]["cycle"], rows[0]["member"])  # one legend entry per curve
        if (~warm).any():
            ax.plot(xs[~warm], loss[~warm], "o-", color="C0", ms=3, label="training" if first else None)
        if np.isfinite(held).any():
            ax.plot(xs, held, "^--", color="C2", ms=3, label="held-out positions" if first else None)
        if warm.any():
            ax2 = ax2 or ax.twinx()
            ax2.plot(xs[warm], loss[warm], "s-", color="C1", ms=3)
        ax.axvline(x - 0.5, color="0.8", lw=0.8)
        ax.text(x, 1.0, f"c{cycle}" + (f" m{member}" if member else ""), transform=ax.get_xaxis_transform(),
                fontsize=7, va="bottom")
        x += len(rs)
    ax.set_xlabel("epoch (all cycles)")
    ax.set_ylabel("loss (Poisson NLL)", color="C0")
    if ax2 is not None:
        ax2.set_ylabel("warm-up loss (z-MSE)", color="C1")
    ax.set_title("training loss per epoch across cycles", fontsize=10, pad=14)
    if any(np.isfinite(r.get("heldout", np.nan)) for r in rows):
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


CYCLE_PANELS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("bf_err", "BF error"), ("adf_err", "ADF error"),
                ("com_y_err", "CoM y error"), ("com_x_err", "CoM x error"))


def cycle_metrics_figure(path: str | Path, methods: dict[str, dict]) -> Path | None:
    """Each metric per cycle; raw, final and baselines as horizontal lines."""
    cycles = sorted((int(k.split("_")[1]), k) for k in methods if k.startswith("cycle_"))
    if not cycles:
        return None
    others = [k for k in methods if not k.startswith("cycle_")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, label) in zip(axes.ravel(), CYCLE_PANELS, strict=True):
        ax.plot([c for c, _ in cycles], [methods[k][key] for _, k in cycles], "o-", color="k", label="cycles")
        for i, name in enumerate(others):
            ax.axhline(methods[name][key], color=f"C{i}", ls="--", lw=1, label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("cycle")
        ax.set_xticks([c for c, _ in cycles])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def run_figures(paths, raw, final, reference=None) -> list[Path]:
    """The figures of a finished ``denoise`` run: virtual images, example patterns, loss curve.

    Cheap: masks from the mean of a few raw chunks, one streamed pass for all virtual images.
    Never fails the run: a problem is logged as a warning.
    """
    try:
        out = report_dir(paths.root)
        masks = find_masks(mean_pattern(raw, max_chunks=16))
        cubes = {"raw": raw, "denoised": final}
        if reference is not None:
            cubes["high-dose reference"] = reference
        imgs = da.compute(*[virtual_images_lazy(c, masks) for c in cubes.values()])
        drawn = [virtual_figure(out / "virtual_images.png", dict(zip(cubes, imgs, strict=True)),
                                scale_from="high-dose reference" if reference is not None else "denoised",
                                masks=masks),
                 patterns_figure(out / "patterns.png", cubes, example_positions(*raw.shape[:2]))]
        loss = loss_figure(out / "loss.png", paths.root)
        if loss is not None:
            drawn.append(loss)
        log.info("figures in %s: %s", out, ", ".join(p.name for p in drawn))
        return drawn
    except Exception as exc:  # a figure must never cost a finished run
        log.warning("run figures not drawn: %s", exc)
        return []


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
