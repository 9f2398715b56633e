"""The refinement cycles of one run: prepare RUN_DIR, train and infer each cycle, resume, finish."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
import zarr

from .. import console, faults
from ..config import Config, ConfigError, apply, load, resolve_auto
from ..data.tiles import Grid, fold_positions
from ..errors import InputError, StemdistError
from ..io.checks import check_chunks, check_shape, check_values
from ..io.convert import convert
from ..io.formats import is_object, label, open_source
from ..io.zarr_store import create_cube, is_zarr, open_cube
from ..layout import COMPLETE, LEFTOVERS, RUN_INFO, RunLock, RunPaths, cycle_name, is_complete, mark_complete
from ..quality.figures import cycle_figure, denoised_figure, run_figures
from ..quality.metrics import bright_field_mask, virtual_bf_lazy
from ..train.module import Denoiser, averaged, ensemble_lasts, weights_state
from ..train.trainer import train_cycle
from . import hardware
from . import ranks as rk
from .final import plan_final, raw_mean_pattern, write_final
from .inference import infer

log = logging.getLogger("stemdist")

RESUMABLE = {"hardware", "data.num_workers", "data.prefetch_factor", "data.cache_chunks",
             "inference.batch_size"}  # keys a resumed run may change: they do not change the result


def setup_logging(path: Path | None, verbose: bool = True) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if verbose and not console.QUIET:
        out = logging.StreamHandler()
        out.setFormatter(logging.Formatter("[stemdist] %(message)s"))
        log.addHandler(out)
    if path is not None:
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)


def _check_resume_config(saved: Config, new: dict, info: dict) -> None:
    """A resumed run keeps its configuration; only keys that do not change the result may differ."""
    changed = resolve_auto(apply(saved, new, "override"), mean_counts(info))[0]
    for section, values in new.items():
        for key in values or {}:
            if section in RESUMABLE or f"{section}.{key}" in RESUMABLE:
                continue
            before, after = getattr(getattr(saved, section), key), getattr(getattr(changed, section), key)
            if before != after:
                raise ConfigError(f"--resume keeps the run's saved configuration; {section}.{key} was {before!r} "
                                  f"and cannot become {after!r} (start a new RUN_DIR to change it)")


def fits_grid(arr: zarr.Array, tile: int | None) -> bool:
    """Whether ``arr``'s chunks can be the run's grid: whole patterns per chunk, and ``data.tile`` if set."""
    if tuple(arr.chunks[2:]) != tuple(arr.shape[2:]):
        return False
    return tile is None or tuple(arr.chunks[:2]) == (min(tile, arr.shape[0]), min(tile, arr.shape[1]))


def _array_path(arr: zarr.Array, given: Path) -> str:
    root = Path(arr.store.root) if hasattr(arr.store, "root") else given
    return str(root / arr.path if arr.path else root)


def _interrupted_setup(root: Path) -> bool:
    """A RUN_DIR holding only what an interrupted set-up leaves (no ``run.json`` yet): safe to redo."""
    return root.is_dir() and not (root / RUN_INFO).exists() and all(p.name in LEFTOVERS for p in root.iterdir())


def prepare(input_path: Any, paths: RunPaths, config: Config, dataset: str | None, resume: bool,
            overrides: dict, lock: RunLock) -> dict:
    """Rank 0: check the input and RUN_DIR, convert the input if needed, write config and run info.

    The input's Zarr chunks become the run's one grid (training tiles, inference tiles, output chunks);
    an input that is not Zarr, or whose chunks do not fit (``fits_grid``), is converted into
    ``RUN_DIR/input.zarr`` first (atomically: an interrupted conversion is redone), and the log says so.
    ``run.json`` is written last: a RUN_DIR without it is a set-up to redo, never a dead end.
    """
    root = paths.root
    redo = _interrupted_setup(root)
    if resume and not paths.run_info.exists() and not redo:
        raise InputError(f"--resume: {root} holds no stemdist run (no run.json)")
    if not resume and root.exists() and any(root.iterdir()) and not redo:
        raise InputError(f"run directory {root} exists and is not empty; use --resume to continue it, "
                         "or choose a new --out")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if paths.run_info.exists():  # a resumed run
        info = paths.read_info()
        _check_resume_config(load(paths.config), overrides, info)
        return info
    try:
        return _set_up(input_path, paths, config, dataset)
    except StemdistError:
        lock.release()
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise


def _set_up(input_path: Any, paths: RunPaths, config: Config, dataset: str | None) -> dict:
    what = label(input_path)
    if not is_object(input_path):
        input_path = Path(input_path)
    for name in LEFTOVERS - {".lock"}:  # what an interrupted set-up left
        left = paths.root / name
        if left.is_dir():
            shutil.rmtree(left)
        else:
            left.unlink(missing_ok=True)
    arr = open_cube(input_path, dataset) if not is_object(input_path) and is_zarr(input_path) else None
    rechunked = None
    if arr is not None:
        check_chunks(arr, what)
    if arr is not None and fits_grid(arr, config.data.tile):
        raw = _array_path(arr, input_path)
    else:
        if arr is not None:  # told in the run's log once it is open
            rechunked = list(arr.chunks)
        partial = paths.input.with_name(paths.input.name + ".partial")
        convert(input_path, partial, dataset=dataset, tile=config.data.tile, overwrite=True)
        faults.point("convert")
        os.replace(partial, paths.input)
        raw = str(paths.input)
    arr = zarr.open_array(raw, mode="r")
    mask = bright_field_mask(arr)
    darr = da.from_zarr(arr)
    extra = (virtual_bf_lazy(darr, mask), darr.astype(np.float64).mean(axis=(0, 1)))
    if darr.dtype.kind == "f":  # counts stored as floats are fine; values between whole numbers are not counts
        extra += (da.count_nonzero(darr != da.round(darr)),)
    raw_bf, mean, *fractional = check_values(arr, what, extra)
    totals = mean.sum()
    paths.report.mkdir(exist_ok=True)
    np.save(paths.mean_pattern, mean)
    np.save(paths.raw_bf, raw_bf)
    np.save(paths.bf_mask, mask)
    info = {"input": what if is_object(input_path) else str(input_path.resolve()), "dataset": dataset,
            "raw": str(Path(raw).resolve()),
            "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "mean_counts": float(totals), "rechunked_from": rechunked,
            "not_whole": float(fractional[0]) / arr.size if fractional else 0.0}
    resolve_auto(config, float(totals))[0].save(paths.config)  # the sizes the run trains, for predict and resume
    zarr.open_group(str(paths.denoised), mode="a")
    paths.run_info.write_text(json.dumps(info, indent=2))
    return info


def last_complete_cycle(paths: RunPaths, cycles: int) -> int:
    group = zarr.open_group(str(paths.denoised), mode="r")
    done = [c for c in range(1, cycles + 1) if cycle_name(c) in group and is_complete(group[cycle_name(c)])]
    return max(done, default=0)  # with keep_cycles=last the earlier cycles are gone


def run(input_path: Any, out: str | Path, config: Config, *, dataset: str | None = None,
        reference: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
        ranks: rk.Ranks | None = None) -> RunPaths:
    """Denoise ``input_path`` (a path, or an in-memory object opened by :func:`stemdist.io.objects.source`)
    into ``out`` (every rank calls this; rank 0 does the bookkeeping)."""
    ranks = ranks or rk.detect()
    paths = RunPaths.of(out)
    rk.init(ranks, hardware.use_cuda(config))
    lock = RunLock(paths)
    info = rk.run_on_main(lambda: prepare(input_path, paths, config, dataset, resume, overrides or {}, lock), ranks)
    try:
        return _cycles(paths, info, config, reference, resume, overrides, ranks)
    finally:
        lock.release()


def _cycles(paths: RunPaths, info: dict, config: Config, reference: str | Path | None, resume: bool,
            overrides: dict | None, ranks: rk.Ranks) -> RunPaths:
    """Every rank: the refinement cycles, then the final cube."""
    if resume:
        config = apply(load(paths.config), overrides or {}, "override")
    if ranks.is_main:
        setup_logging(paths.log_file)
        log.info("run %s: input %s, shape %s, %d rank(s)", paths.root, info["input"], info["shape"],
                 ranks.world_size)
        if info.get("rechunked_from"):
            log.info("input chunks %s did not fit the run's grid (whole patterns, data.tile=%s): rechunked into %s, "
                     "chunks %s", tuple(info["rechunked_from"]), config.data.tile, paths.input, tuple(info["chunks"]))
        if info.get("not_whole"):
            log.warning("%.1f%% of the input's values are not whole numbers: the Poisson loss and the fusion's noise "
                        "model assume electron counts; divide a cube in detector units by one electron's signal "
                        "first", 100 * info["not_whole"])
    else:
        setup_logging(None, verbose=False)
    if config.model.centre and info.get("not_whole"):
        raise InputError(f"model.centre {config.model.centre:g} splits each pattern's counts in two (binomial "
                         f"thinning), which needs whole numbers: {100 * info['not_whole']:.1f}% of {info['input']}'s "
                         "values are not; divide a cube in detector units by one electron's signal first, or set "
                         "model.centre: 0")
    config, sized = resolve_auto(config, mean_counts(info))
    if sized and ranks.is_main:
        log.info("sized from the counts: %s", sized)
    raw = zarr.open_array(info["raw"], mode="r")
    grid = Grid.of(raw)  # the one grid: training tiles, inference tiles and output chunks
    C = config.train.cycles
    device = hardware.device(config, ranks)
    hardware.setup(config, ranks)
    mean_pattern = raw_mean_pattern(paths, raw)
    K = config.train.crossfit
    modules = [new_module(config, k, mean_pattern) for k in range(max(config.train.ensemble, K))]
    folds = [fold_positions(grid, config.data.borders, k, K, config.train.seed) for k in range(K)] if K > 1 else None
    start = last_complete_cycle(paths, C) if resume else 0
    if start:
        lasts = ensemble_lasts(torch.load(paths.cycle_weights(start), map_location="cpu"), len(modules))
        for module, last in zip(modules, lasts, strict=True):
            module.net.load_state_dict(last)
        if ranks.is_main:
            log.info("resuming after complete cycle %d of %d", start, C)
    raw_bf = np.load(paths.raw_bf) if ranks.is_main else None  # computed once, while checking the input
    bf_mask = np.load(paths.bf_mask)
    for c in range(start + 1, C + 1):
        t0 = time.perf_counter()
        beta = c / C
        den = str(paths.cycle(c - 1)) if c > 1 else None  # cycle 1 blends raw with raw: the raw cube
        groups = []  # per module, the networks whose outputs inference averages
        for k, module in enumerate(modules):
            own = train_cycle(module, member_config(config, k), ranks, paths, c, info["raw"], den, beta,
                              hardware.accelerator(config), hardware.precision(config), member=k,
                              fold=None if folds is None else folds[k])
            groups.append(own or ([{n: v.detach().clone() for n, v in module.net.state_dict().items()}]
                                  if len(modules) > 1 else []))
        members = [m for g in groups for m in g]
        module = modules[0]
        if ranks.is_main:
            paths.cycle_weights(c).parent.mkdir(exist_ok=True)
            torch.save(weights_state(modules, members, K), paths.cycle_weights(c))
            if folds is not None:
                log.info("cycle %d: each probe position predicted by the network of its fold (train.crossfit %d), "
                         "the mean of %d networks' outputs (train.average_epochs)", c, K, len(groups[0]))
            elif len(modules) > 1:
                log.info("cycle %d: inference averages the outputs of %d networks: %d seeds' (train.ensemble), each "
                         "its last epochs' (train.average_epochs)", c, len(members), len(modules))
            elif len(members) > 1:
                log.info("cycle %d: inference averages the outputs of %d epochs' networks (train.average_epochs)",
                         c, len(members))
            create_cube(str(paths.denoised), cycle_name(c), tuple(raw.shape), grid.tile, overwrite=True,
                        attrs={COMPLETE: False, "cycle": c, "beta": beta})
        rk.barrier()
        out_arr = zarr.open_array(str(paths.cycle(c)), mode="r+")
        den_arr = zarr.open_array(den, mode="r") if den else None
        model = ([averaged(m, g).to(device) for m, g in zip(modules, groups, strict=True)] if folds is not None
                 else averaged(module, members).to(device))
        with console.bar(f"cycle {c} inference", grid.n_tiles // ranks.world_size, ranks.is_main) as advance:
            images = infer(model, raw, den_arr, beta, out_arr, borders=config.data.borders,
                           batch_size=config.inference.batch_size, device=device, rank=ranks.rank,
                           world_size=ranks.world_size, cache_chunks=config.data.cache_chunks,
                           autocast=hardware.autocast_dtype(config), progress=advance,
                           threads=hardware.io_threads(ranks.local_world_size), bf_mask=bf_mask,
                           halo=config.model.halo, seed=config.train.seed)
        del model
        for m in modules:
            m.cpu().train()
        bf, totals = rk.sum_to_main(images)
        rk.barrier()
        rk.run_on_main(lambda c=c, totals=totals, out_arr=out_arr: check_cycle(paths, info, c, totals, out_arr), ranks)
        if ranks.is_main:
            cycle_figure(paths.report / f"{cycle_name(c)}_bf.png", c, raw_bf, bf,
                         paths.logs / "tensorboard" / cycle_name(c))
            mark_complete(out_arr, seconds=round(time.perf_counter() - t0, 2))
            if config.output.keep_cycles == "last" and c > 1:
                shutil.rmtree(paths.cycle(c - 1), ignore_errors=True)
            log.info("cycle %d of %d complete in %.1f s", c, C, time.perf_counter() - t0)
        rk.barrier()
    gain, plan = rk.run_on_main(lambda: plan_final(paths, config, raw), ranks)
    write_final(paths, config, raw, gain, plan, ranks)
    rk.barrier()
    if ranks.is_main:
        finish(paths, config, raw, reference)
    rk.barrier()
    return paths


def member_config(config: Config, k: int) -> Config:
    """Ensemble member ``k``'s configuration: the run's, its seed ``train.seed + k``."""
    if not k:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"seed": config.train.seed + k})})


def new_module(config: Config, k: int, mean_pattern: np.ndarray) -> Denoiser:
    """Ensemble member ``k``'s LightningModule, initialised from the seed ``train.seed + k``: member ``k`` is the
    network a run with that seed trains."""
    torch.manual_seed(config.train.seed + k)
    module = Denoiser(config.model, config.train, channels_last=hardware.channels_last(config))
    module.net.set_mean_pattern(mean_pattern)
    if config.hardware.compile:
        module.compile_net()
    return module


def mean_counts(info: dict) -> float:
    """The raw cube's mean counts per pattern (measured at set-up; runs of earlier versions measure it here)."""
    if info.get("mean_counts") is None:
        info["mean_counts"] = float(da.from_zarr(info["raw"]).astype(np.float64).sum(axis=(2, 3)).mean())
    return info["mean_counts"]


DIVERGED = 3.0  # a cycle whose mean counts per pattern are off the raw cube's by more than this factor


def check_cycle(paths: RunPaths, info: dict, c: int, totals: np.ndarray, out: zarr.Array) -> None:
    """Rank 0: stop the run if cycle ``c``'s cube is not in counts (non-finite, or its mean counts per pattern
    off the raw cube's by more than ``DIVERGED``x). Its array stays without ``complete``: it is never fused,
    exported or fed to the next cycle."""
    raw_mean = mean_counts(info)
    mean = float(totals.mean())
    ratio = mean / raw_mean if raw_mean > 0 else float("nan")
    if not np.isfinite(totals).all() or not (1 / DIVERGED <= ratio <= DIVERGED):
        out.attrs.update({COMPLETE: False, "diverged": True, "mean_counts": mean})
        raise InputError(f"cycle {c} diverged: its patterns hold {mean:.4g} counts on average where the raw cube "
                         f"holds {raw_mean:.4g}; {out.path or paths.cycle(c).name} is left incomplete and unused. "
                         "Train longer (train.epochs), lower train.lr, or shorten train.warmup_epochs")
    log.info("cycle %d: %.4g counts per pattern on average (raw %.4g)", c, mean, raw_mean)


def finish(paths: RunPaths, config: Config, raw: zarr.Array, reference: str | Path | None) -> None:
    """Rank 0, once every rank wrote its part of the final cube: the weights and the figures."""
    final = zarr.open_array(str(paths.final), mode="r+")
    mark_complete(final)
    shutil.copyfile(paths.cycle_weights(config.train.cycles), paths.weights)
    ref = None
    if reference is not None:
        ref, _ = open_source(reference)
        check_shape(ref.shape, str(reference))
    denoised_figure(paths.figure, np.load(paths.raw_bf), final, np.load(paths.bf_mask), ref)
    log.info("final cube %s, weights %s, figure %s", paths.final, paths.weights, paths.figure)
    run_figures(paths, raw, final, ref)
