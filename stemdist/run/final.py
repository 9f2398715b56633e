"""The final estimate: the last cycle (or the mean of the cycles), calibrated and fused, chunk by chunk."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import zarr

from ..config import Config
from ..console import bar
from ..data.tiles import Grid
from ..io.zarr_store import create_cube
from ..layout import COMPLETE, FINAL, RunPaths
from ..quality.sure import sure_sigma
from . import fusion
from .inference import owned_tiles
from .ranks import Ranks

log = logging.getLogger("stemdist")


def raw_mean_pattern(paths: RunPaths, raw: zarr.Array) -> np.ndarray:
    """The raw cube's mean pattern, saved at set-up (computed here for runs of earlier versions)."""
    if paths.mean_pattern.exists():
        return np.load(paths.mean_pattern)
    return da.from_zarr(raw).astype(np.float64).mean(axis=(0, 1)).compute()


def detector_gain(raw: zarr.Array, estimate: da.Array) -> np.ndarray:
    """Per detector pixel, mean raw counts over the scan / mean estimate: the raw cube is an unbiased
    estimate of the truth, so over thousands of patterns its mean pattern is nearly exact, and scaling
    by this gain removes a network's systematic per-pixel bias (two streamed passes)."""
    raw_mean, est_mean = da.compute(da.from_zarr(raw).astype(np.float64).mean(axis=(0, 1)),
                                    estimate.astype(np.float64).mean(axis=(0, 1)))
    return np.where(est_mean > 1e-12, raw_mean / np.maximum(est_mean, 1e-12), 1.0)


def estimate(paths: RunPaths, config: Config) -> da.Array:
    """The final estimate before calibration and fusion: the last cycle, or the mean of the cycles."""
    C = config.train.cycles
    if config.output.final == "mean":
        return da.stack([da.from_zarr(str(paths.cycle(c))) for c in range(1, C + 1)]).mean(axis=0)
    return da.from_zarr(str(paths.cycle(C)))


def fusion_plan(paths: RunPaths, config: Config, raw: zarr.Array, stack: da.Array
                ) -> tuple[fusion.Plan | fusion.RegionPlan, str]:
    """The fusion's plan and how it was chosen."""
    if config.output.fuse_sigma is not None:
        return fusion.Plan(config.output.fuse_sigma), "set by output.fuse_sigma"
    if config.output.fuse_by == "bright_field":
        return (fusion.Plan(sure_sigma(np.load(paths.raw_bf))),
                "chosen by SURE on the raw bright-field image")
    share_sigma = sure_sigma(np.load(paths.raw_bf)) / 2
    frame = config.model.halo if config.data.borders == "copy" else 0  # patterns copied through
    plan = fusion.plan_regions(raw, stack, raw_mean_pattern(paths, raw), config.output.fuse_sectors, share_sigma,
                               halo=config.model.halo, frame=frame, wiener=config.output.fuse_wiener)
    return plan, f"chosen by SURE per detector region: {plan.summary()}"


def plan_final(paths: RunPaths, config: Config, raw: zarr.Array
               ) -> tuple[np.ndarray | None, fusion.Plan | fusion.RegionPlan | None]:
    """Rank 0: the calibration gain (or None) and the fusion's plan; creates the (empty) final array."""
    C = config.train.cycles
    stack = estimate(paths, config)
    attrs = {COMPLETE: False, "estimate": config.output.final, "cycles": C, "calibrated": config.output.calibrate}
    gain = None
    if config.output.calibrate:
        gain = detector_gain(raw, stack).astype(np.float32)
        attrs["gain_range"] = [float(gain.min()), float(gain.max())]
    plan = None
    if config.output.fuse:
        plan, how = fusion_plan(paths, config, raw, stack if gain is None else stack * gain)
        if isinstance(plan, fusion.Plan):
            attrs["fuse_sigma"] = float(plan.sigma)
            log.info("final cube: fused with the raw counts over the scan, sigma %.2f positions (%s)",
                     attrs["fuse_sigma"], how)
        else:
            attrs["fuse_plan"] = plan.describe()
            log.info("final cube: fused with the raw counts over the scan, %s", how)
    create_cube(str(paths.denoised), FINAL, tuple(raw.shape), Grid.of(raw).tile, overwrite=True, attrs=attrs)
    return gain, plan


def write_final(paths: RunPaths, config: Config, raw: zarr.Array, gain: np.ndarray | None,
                plan: fusion.Plan | fusion.RegionPlan | None, ranks: Ranks) -> None:
    """Every rank: its own whole chunks of the final cube (calibrated, fused), as in inference."""
    stack = estimate(paths, config)
    if gain is not None:
        stack = stack * gain
    final = zarr.open_array(str(paths.final), mode="r+")
    mine = owned_tiles(Grid.of(final).n_tiles, ranks.rank, ranks.world_size)
    with bar("final cube", len(mine), ranks.is_main) as advance:
        fusion.fuse_into(final, raw, stack, 0.0 if plan is None else plan, chunks=mine, progress=advance)
