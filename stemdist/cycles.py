"""The refinement cycles of one run: prepare RUN_DIR, train and infer each cycle, resume, finish."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import zarr

from . import distributed, fusion, progress, storage
from .config import Config, ConfigError, apply, load
from .errors import InputError
from .figures import bright_field_mask, cycle_figure, denoised_figure, virtual_bf, virtual_bf_lazy
from .formats import open_source
from .inference import infer, owned_tiles
from .module import Denoiser
from .progress import bar
from .report import run_figures
from .training import precision, train_cycle, use_cuda

log = logging.getLogger("stemdist")

DENOISED = "denoised.zarr"
RESUMABLE = {"hardware", "output.progress", "data.num_workers", "data.prefetch_factor", "data.cache_chunks",
             "inference.batch_size"}  # keys a resumed run may change: they do not change the result


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs go."""

    root: Path

    @property
    def denoised(self) -> Path:
        return self.root / DENOISED

    def cycle(self, c: int) -> Path:
        return self.denoised / f"cycle_{c:02d}"

    @property
    def final(self) -> Path:
        return self.denoised / "final"

    @property
    def weights(self) -> Path:
        return self.root / "unet_denoiser.pt"

    def cycle_weights(self, c: int) -> Path:
        return self.root / "weights" / f"cycle_{c:02d}.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def figure(self) -> Path:
        return self.root / "denoised.png"

    @property
    def input(self) -> Path:
        return self.root / "input.zarr"

    @property
    def raw_bf(self) -> Path:
        return self.root / "report" / "raw_bf.npy"

    @property
    def bf_mask(self) -> Path:
        return self.root / "report" / "bf_mask.npy"

    @property
    def log_file(self) -> Path:
        return self.root / "stemdist.log"


def setup_logging(path: Path | None, verbose: bool = True) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if verbose and not progress.QUIET:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("[stemdist] %(message)s"))
        log.addHandler(console)
    if path is not None:
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)


def _check_resume_config(saved: Config, new: dict) -> None:
    """A resumed run keeps its configuration; only keys that do not change the result may differ."""
    changed = apply(saved, new, "override")
    for section, values in new.items():
        for key in values or {}:
            if section in RESUMABLE or f"{section}.{key}" in RESUMABLE:
                continue
            before, after = getattr(getattr(saved, section), key), getattr(getattr(changed, section), key)
            if before != after:
                raise ConfigError(f"--resume keeps the run's saved configuration; {section}.{key} was {before!r} "
                                  f"and cannot become {after!r} (start a new RUN_DIR to change it)")


def prepare(input_path: str | Path, paths: RunPaths, config: Config, dataset: str | None, resume: bool,
            overrides: dict) -> dict:
    """Rank 0: check the input and RUN_DIR, convert the input if needed, write config and run info."""
    root = paths.root
    if resume:
        if not paths.run_info.exists():
            raise InputError(f"--resume: {root} holds no stemdist run (no run.json)")
        info = json.loads(paths.run_info.read_text())
        _check_resume_config(load(paths.config), overrides)
        return info
    if root.exists() and any(root.iterdir()):
        raise InputError(f"run directory {root} exists and is not empty; use --resume to continue it, "
                         "or choose a new --out")
    input_path = Path(input_path)
    if storage.is_zarr(input_path):
        arr = storage.open_cube(input_path, dataset)
        mask = bright_field_mask(arr)
        (raw_bf,) = storage.check_values(arr, str(input_path), (virtual_bf_lazy(arr, mask),))  # one pass
        raw = str(Path(arr.store.root) if hasattr(arr.store, "root") else input_path)
        if arr.path:
            raw = str(Path(raw) / arr.path)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root.mkdir(parents=True, exist_ok=True)
        try:
            storage.convert(input_path, paths.input, dataset=dataset, tile=config.data.tile)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        raw = str(paths.input)
        mask = bright_field_mask(zarr.open_array(raw, mode="r"))
        raw_bf = virtual_bf(zarr.open_array(raw, mode="r"), mask)
    arr = zarr.open_array(raw, mode="r")
    (root / "report").mkdir(exist_ok=True)
    np.save(paths.raw_bf, raw_bf)
    np.save(paths.bf_mask, mask)
    info = {"input": str(Path(input_path).resolve()), "dataset": dataset, "raw": str(Path(raw).resolve()),
            "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks)}
    config.save(paths.config)
    paths.run_info.write_text(json.dumps(info, indent=2))
    zarr.open_group(str(paths.denoised), mode="a")
    return info


def last_complete_cycle(paths: RunPaths, cycles: int) -> int:
    group = zarr.open_group(str(paths.denoised), mode="r")
    done = [c for c in range(1, cycles + 1) if storage.is_complete(group, f"cycle_{c:02d}")]
    return max(done, default=0)  # with keep_cycles=last the earlier cycles are gone


def _tile(config: Config, raw: zarr.Array) -> int:
    if config.data.tile:
        return config.data.tile
    if raw.chunks[2:] == raw.shape[2:]:
        return raw.chunks[0]
    return storage.default_tile(raw.shape, 4)


def run(input_path: str | Path, out: str | Path, config: Config, *, dataset: str | None = None,
        reference: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
        ranks: distributed.Ranks | None = None) -> RunPaths:
    """Denoise ``input_path`` into ``out`` (every rank calls this; rank 0 does the bookkeeping)."""
    ranks = ranks or distributed.detect()
    paths = RunPaths(Path(out).resolve())
    distributed.init(ranks, use_cuda(config))
    info = distributed.run_on_main(
        lambda: prepare(input_path, paths, config, dataset, resume, overrides or {}), ranks)
    if resume:
        config = apply(load(paths.config), overrides or {}, "override")
    if ranks.is_main:
        setup_logging(paths.log_file)
        log.info("run %s: input %s, shape %s, %d rank(s)", paths.root, info["input"], info["shape"],
                 ranks.world_size)
    else:
        setup_logging(None, verbose=False)
    raw = zarr.open_array(info["raw"], mode="r")
    tile = _tile(config, raw)
    C = config.train.cycles
    device = torch.device(f"cuda:{ranks.local_rank}" if use_cuda(config) and ranks.world_size > 1
                          else "cuda" if use_cuda(config) else "cpu")
    torch.manual_seed(config.train.seed)
    if ranks.local_world_size > 1 and not use_cuda(config):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    if use_cuda(config):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module = Denoiser(config.model, config.train, channels_last=config.hardware.channels_last and use_cuda(config))
    if config.hardware.compile:
        module.compile_net()
    start = last_complete_cycle(paths, C) if resume else 0
    if start:
        module.net.load_state_dict(torch.load(paths.cycle_weights(start), map_location="cpu"))
        if ranks.is_main:
            log.info("resuming after complete cycle %d of %d", start, C)
    raw_bf = np.load(paths.raw_bf) if ranks.is_main else None  # computed once, while checking the input
    bf_mask = np.load(paths.bf_mask)
    for c in range(start + 1, C + 1):
        t0 = time.perf_counter()
        beta = c / C
        den = str(paths.cycle(c - 1)) if c > 1 else None  # cycle 1 blends raw with raw: the raw cube
        train_cycle(module, config, ranks, paths.root, c, info["raw"], den, beta)
        if ranks.is_main:
            paths.cycle_weights(c).parent.mkdir(exist_ok=True)
            torch.save(module.net.state_dict(), paths.cycle_weights(c))
            storage.create_cube(str(paths.denoised), f"cycle_{c:02d}", tuple(raw.shape), tile, overwrite=True,
                                attrs={"cycle": c, "beta": beta})
        distributed.barrier()
        out_arr = zarr.open_array(str(paths.cycle(c)), mode="r+")
        den_arr = zarr.open_array(den, mode="r") if den else None
        module.to(device)
        n_tiles = -(-raw.shape[0] // out_arr.chunks[0]) * -(-raw.shape[1] // out_arr.chunks[1])
        with bar(f"cycle {c} inference", n_tiles // ranks.world_size, ranks.is_main) as advance:
            bf = infer(module, raw, den_arr, beta, out_arr, borders=config.data.borders,
                  batch_size=config.inference.batch_size, device=device, rank=ranks.rank,
                  world_size=ranks.world_size, cache_chunks=config.data.cache_chunks,
                  autocast="bf16" if precision(config) == "bf16-mixed" else None, progress=advance,
                  bf_mask=bf_mask)
        module.cpu().train()
        bf = distributed.sum_to_main(bf)
        distributed.barrier()
        if ranks.is_main:
            cycle_figure(paths.root / "report" / f"cycle_{c:02d}_bf.png", c, raw_bf, bf,
                         paths.root / "logs" / "tensorboard" / f"cycle_{c:02d}")
            storage.mark_complete(out_arr, seconds=round(time.perf_counter() - t0, 2))
            if config.output.keep_cycles == "last" and c > 1:
                shutil.rmtree(paths.cycle(c - 1), ignore_errors=True)
            log.info("cycle %d of %d complete in %.1f s", c, C, time.perf_counter() - t0)
        distributed.barrier()
    gain, sigma = distributed.run_on_main(lambda: plan_final(paths, config, raw), ranks)
    write_final(paths, config, raw, gain, sigma, ranks)
    distributed.barrier()
    if ranks.is_main:
        finish(paths, config, raw, reference)
    distributed.barrier()
    return paths


def detector_gain(raw: zarr.Array, estimate: da.Array) -> np.ndarray:
    """Per detector pixel, mean raw counts over the scan / mean estimate: the raw cube is an unbiased
    estimate of the truth, so over thousands of patterns its mean pattern is nearly exact, and scaling
    by this gain removes a network's systematic per-pixel bias (two streamed passes)."""
    raw_mean, est_mean = da.compute(da.from_zarr(raw).astype(np.float64).mean(axis=(0, 1)),
                                    estimate.astype(np.float64).mean(axis=(0, 1)))
    return np.where(est_mean > 1e-12, raw_mean / np.maximum(est_mean, 1e-12), 1.0)


def _estimate(paths: RunPaths, config: Config) -> da.Array:
    """The final estimate before calibration and fusion: the last cycle, or the mean of the cycles."""
    C = config.train.cycles
    if config.output.final == "mean":
        return da.stack([da.from_zarr(str(paths.cycle(c))) for c in range(1, C + 1)]).mean(axis=0)
    return da.from_zarr(str(paths.cycle(C)))


def plan_final(paths: RunPaths, config: Config, raw: zarr.Array) -> tuple[np.ndarray | None, float]:
    """Rank 0: the calibration gain (or None) and the fusion's sigma; creates the (empty) final array."""
    C = config.train.cycles
    stack = _estimate(paths, config)
    attrs = {"estimate": config.output.final, "cycles": C, "calibrated": config.output.calibrate}
    gain = None
    if config.output.calibrate:
        gain = detector_gain(raw, stack).astype(np.float32)
        attrs["gain_range"] = [float(gain.min()), float(gain.max())]
    sigma = 0.0
    if config.output.fuse:
        sigma = config.output.fuse_sigma
        how = "set by output.fuse_sigma"
        if sigma is None:
            sigma, how = fusion.sure_sigma(np.load(paths.raw_bf)), "chosen by SURE on the raw bright-field image"
        attrs["fuse_sigma"] = sigma
        log.info("final cube: fused with the raw counts over the scan, sigma %.2f positions (%s)", sigma, how)
    tile = zarr.open_array(str(paths.cycle(C)), mode="r").chunks[0]
    storage.create_cube(str(paths.denoised), "final", tuple(raw.shape), tile, overwrite=True, attrs=attrs)
    return gain, float(sigma)


def write_final(paths: RunPaths, config: Config, raw: zarr.Array, gain: np.ndarray | None, sigma: float,
                ranks: distributed.Ranks) -> None:
    """Every rank: its own whole chunks of the final cube (calibrated, fused), as in inference."""
    stack = _estimate(paths, config)
    if gain is not None:
        stack = stack * gain
    final = zarr.open_array(str(paths.final), mode="r+")
    n = -(-final.shape[0] // final.chunks[0]) * -(-final.shape[1] // final.chunks[1])
    mine = owned_tiles(n, ranks.rank, ranks.world_size)
    with bar("final cube", len(mine), ranks.is_main) as advance:
        fusion.fuse_into(final, raw, stack, sigma, chunks=mine, progress=advance)


def finish(paths: RunPaths, config: Config, raw: zarr.Array, reference: str | Path | None) -> None:
    """Rank 0, once every rank wrote its part of the final cube: the weights and the figures."""
    C = config.train.cycles
    final = zarr.open_array(str(paths.final), mode="r+")
    storage.mark_complete(final)
    shutil.copyfile(paths.cycle_weights(C), paths.weights)
    ref = None
    if reference is not None:
        ref, _ = open_source(reference)
        storage.check_shape(ref.shape, str(reference))
    denoised_figure(paths.figure, np.load(paths.raw_bf), final, np.load(paths.bf_mask), ref)
    log.info("final cube %s, weights %s, figure %s", paths.final, paths.weights, paths.figure)
    run_figures(paths, raw, final, ref)
