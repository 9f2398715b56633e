"""``stemdist bench train``: training samples/s per device and the share of step time spent waiting for data.

The product's own pieces are timed: :class:`stemdist.dataset.NeighbourPatches` on a compressed Zarr
cube with the cycle blend, :func:`stemdist.train.trainer.loader` (workers, prefetch, pinned memory on CUDA)
and :func:`stemdist.train.trainer.trainer` (precision, checkpoints, loggers). The loader handed to Lightning is
wrapped so that every ``next()`` on it is timed: that is the time the training loop waits for data.
Each setting trains for ``--epochs`` epochs; the first epoch includes starting the loader workers,
so the steady state is read from the later ones.

Headline: data wait as a percentage of step time in the steady state with the default configuration
(goal <= 5%).
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch

from .. import config as cfg
from ..data.dataset import NeighbourPatches
from ..layout import RunPaths
from ..run import hardware
from ..run.ranks import Ranks
from ..train.module import Denoiser
from ..train.trainer import loader, trainer
from . import common

GOAL = 5.0
DOSE = 100.0  # electrons per pattern of the timed cube


class TimedLoader:
    """Iterates like the wrapped loader and records, per epoch, the seconds each ``next()`` took."""

    def __init__(self, inner):
        self.inner = inner
        self.dataset = inner.dataset
        self.epochs: list[dict] = []

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        rec = {"wait": 0.0, "batches": 0, "samples": 0, "first_wait": 0.0, "start": time.perf_counter()}
        self.epochs.append(rec)
        it = iter(self.inner)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                rec["wait"] += time.perf_counter() - t0
                rec["end"] = time.perf_counter()
                return
            dt = time.perf_counter() - t0
            if rec["batches"] == 0:
                rec["first_wait"] = dt
            rec["wait"] += dt
            rec["batches"] += 1
            rec["samples"] += len(batch[0])
            yield batch


class EpochEnd(pl.Callback):
    """Stamps the end of each epoch (Lightning stops at ``len`` batches without exhausting the iterator)."""

    def __init__(self, timed: TimedLoader):
        self.timed = timed

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.timed.epochs[-1].setdefault("end", time.perf_counter())


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "tiny cube and network, one worker setting (CI)")
    p.add_argument("--scan", type=int, default=24, help="scan edge")
    p.add_argument("--det", type=int, default=64, help="detector edge")
    p.add_argument("--tile", type=int, default=8, help="scan tile (chunk) edge")
    p.add_argument("--beta", type=float, default=0.5, help="blend weight of the denoised cube")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0],
                   help="data.num_workers settings to compare (the first one gives the headline)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per setting (>= 2: the first warms up)")
    p.add_argument("--config", help="YAML file or built-in name (default: the default configuration)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def _one(path, workers: int, args, root) -> dict:
    overrides = cfg.parse_overrides(args.set + [f"data.num_workers={workers}", f"train.epochs={args.epochs}"])
    conf = cfg.resolve_auto(cfg.load(args.config, overrides), DOSE)[0]  # the synthetic cube's counts per pattern
    torch.manual_seed(conf.train.seed)
    module = Denoiser(conf.model, conf.train, channels_last=hardware.channels_last(conf))
    if conf.hardware.compile:
        module.compile_net()
    c = conf
    ds = NeighbourPatches(str(path / "noisy"), str(path / "truth"), args.beta, batch_size=c.train.batch_size,
                          borders=c.data.borders, target=c.train.target, shuffle_tiles=c.data.shuffle_tiles,
                          cache_chunks=c.data.cache_chunks, num_workers=c.data.num_workers, seed=c.train.seed,
                          cycle=2, prefetch_factor=c.data.prefetch_factor)
    # split on the device, as in a run
    batches = loader(ds, conf, lambda: module.device, pin_memory=hardware.use_cuda(conf))
    timed = TimedLoader(batches)
    run_dir = root / f"run-w{workers}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        tr = trainer(conf, Ranks(), RunPaths(run_dir), 2, hardware.accelerator(conf), hardware.precision(conf), len(ds))
        tr.callbacks.append(EpochEnd(timed))
        try:
            tr.fit(module, train_dataloaders=timed)
        finally:
            batches.close()
    steady = timed.epochs[1:] or timed.epochs
    wall = sum(e["end"] - e["start"] for e in steady)
    wait = sum(e["wait"] for e in steady)
    first = timed.epochs[0]
    return {"workers": workers, "batch": c.train.batch_size, "precision": hardware.precision(conf),
            "device": "cuda" if hardware.use_cuda(conf) else "cpu",
            "samples_s": sum(e["samples"] for e in steady) / wall, "wait_pct": 100 * wait / wall,
            "step_ms": 1e3 * wall / sum(e["batches"] for e in steady),
            "first_epoch_wait_pct": 100 * first["wait"] / (first["end"] - first["start"]),
            "first_batch_s": first["first_wait"]}


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        args.scan, args.det, args.tile, args.epochs = 8, 16, 4, 2
        args.workers = args.workers[:1] if args.workers != [2, 0] else [1]
        args.set = ["model.base_width=4", "model.depth=2", "train.batch_size=8"] + args.set
    if args.epochs < 2:
        raise SystemExit("bench train: --epochs must be >= 2 (the first epoch warms the loader up)")
    results = []
    with common.workdir(args.workdir, "stemdist-bench-train-") as root:
        path = common.synth_cube(root, (args.scan, args.scan), (args.det, args.det), dose=DOSE,
                                 tile=args.tile, seed=args.seed)
        for w in args.workers:
            results.append(_one(path, w, args, root))
    r0 = results[0]
    print(f"training benchmark: cube {args.scan}x{args.scan}x{args.det}x{args.det}, tile {args.tile}, "
          f"blend beta {args.beta}, device {r0['device']}, precision {r0['precision']}, "
          f"batch {r0['batch']} per device, "
          f"{args.epochs} epochs per setting; steady state = epochs 2..{args.epochs}")
    rows = [[r["workers"], common.fmt_rate(r["samples_s"]), f"{r['step_ms']:.0f}", f"{r['wait_pct']:.1f}%",
             f"{r['first_epoch_wait_pct']:.1f}%", f"{r['first_batch_s']:.2f}"] for r in results]
    print(common.table(["loader workers", "samples/s per device", "ms/step", "data wait (steady)",
                        "data wait (epoch 1)", "first batch s"], rows))
    print(f"train data-wait {r0['wait_pct']:.1f}% (goal <= {GOAL:g}%)")
    return 0
