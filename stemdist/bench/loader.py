"""``stemdist bench loader``: the Zarr tile loader against the reference's in-memory per-sample gather.

Contenders, same batch size, same cube, measured in turns in one run (one epoch per turn):

- ``zarr tiles``: :class:`stemdist.dataset.NeighbourPatches` through a DataLoader, on the compressed
  Zarr store: whole-chunk decodes, one-position halo reads, the cycle blend ``(1 - beta) raw + beta den``
  computed on the fly, shuffling within groups of tiles, and its collation: each group's patterns once
  plus the index of every batch's neighbours and centres. That is what is copied to the GPU, where
  :func:`stemdist.dataset.split_group` builds the ``(B, 8, P, Q)`` stacks by indexing;
- ``zarr tiles + CPU split``: the same, also split into ``(B, 8, P, Q)`` batches on the CPU (what a
  CPU-only run pays; on a GPU the split runs there at memory bandwidth, and it is 9x less to copy);
- ``in-memory reference``: the whole blended cube in RAM as float32 (as the reference script holds it),
  a map-style dataset doing numpy fancy indexing of the 8 neighbours and the centre one sample at a
  time, shuffled, batched by the default collate function: 9 patterns per sample cross to the GPU.

All single-threaded (one codec thread, one torch thread, no workers unless ``--workers``), at two cube
sizes at least 4x apart: a loader whose per-batch cost grows with the cube does not scale. Headline:
samples/s of the Zarr loader over the reference's on the larger cube (goal >= 2).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import NeighbourPatches
from ..data.tiles import OFFSETS
from ..train.trainer import Batches
from . import common

GOAL = 2.0
ZARR, SPLIT, REF = "zarr tiles", "zarr tiles + CPU split", "in-memory reference"


class InMemoryReference(Dataset):
    """The reference's sample access: the whole cube in memory, one fancy-indexed sample at a time."""

    def __init__(self, cube: np.ndarray):
        self.cube = cube
        H, W = cube.shape[:2]
        self.W = W
        self.n = (H - 2) * (W - 2)  # interior positions, as in the reference

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int):
        i, j = divmod(idx, self.W - 2)
        i, j = i + 1, j + 1
        neighbours = self.cube[i + OFFSETS[:, 0], j + OFFSETS[:, 1]]
        centre = self.cube[i, j][None]
        return torch.from_numpy(neighbours), torch.from_numpy(centre)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "tiny cubes and few repetitions (CI)")
    p.add_argument("--scans", type=int, nargs=2, default=[32, 128], metavar=("SMALL", "LARGE"),
                   help="scan edges of the two cubes (default 32 128: 16x apart in positions)")
    p.add_argument("--det", type=int, default=64, help="detector edge")
    p.add_argument("--tile", type=int, default=16, help="scan tile (chunk) edge")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.5, help="blend weight of the denoised cube")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes (both contenders)")
    p.add_argument("--reps", type=int, default=5, help="timed epochs per contender and cube")


def _epoch(loader) -> int:
    n = 0
    for x, _ in loader:
        n += len(x)
    return n


def _groups(loader: DataLoader) -> int:
    n = 0
    for group in loader:
        n += group[1].shape[0] * group[1].shape[1]
        loader.dataset.release(group)
    return n


def _shipped(ds: NeighbourPatches) -> float:
    """Patterns copied to the device per sample by the Zarr loader (the reference copies 9)."""
    patterns = samples = 0
    for p, index, t, _ in ds:
        patterns += len(p) + len(t.reshape(-1, *p.shape[1:])) if t.numel() else len(p)
        samples += index.shape[0] * index.shape[1]
    return patterns / samples


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        args.scans, args.det, args.tile, args.reps = [8, 16], 16, 4, 2
    if args.scans[1] ** 2 < 4 * args.scans[0] ** 2:
        raise SystemExit("bench loader: the two cubes must be at least 4x apart in positions")
    single_threaded()
    B = args.batch_size
    rows, per_batch, rate, shipped = [], {}, {}, {}
    with common.workdir(args.workdir, "stemdist-bench-loader-") as root:
        for n in args.scans:
            path = common.synth_cube(root, (n, n), (args.det, args.det), tile=args.tile, seed=args.seed)
            raw, den = str(path / "noisy"), str(path / "truth")
            ours = NeighbourPatches(raw, den, args.beta, batch_size=B, num_workers=args.workers,
                                    seed=args.seed)
            zloader = DataLoader(ours, batch_size=None, num_workers=args.workers,
                                 persistent_workers=args.workers > 0)
            split = Batches(zloader, len(ours))
            shipped[n] = _shipped(ours)
            # the reference: the blend of the whole cube in memory, float32
            cube = (1 - args.beta) * np.asarray(zarr.open_array(raw, mode="r")[...], dtype=np.float32)
            cube += args.beta * np.asarray(zarr.open_array(den, mode="r")[...], dtype=np.float32)
            ref = InMemoryReference(cube)
            g = torch.Generator().manual_seed(args.seed)
            rloader = DataLoader(ref, batch_size=B, shuffle=True, num_workers=args.workers, generator=g,
                                 drop_last=False, persistent_workers=args.workers > 0)
            samples = {ZARR: len(ours) * B, SPLIT: len(ours) * B, REF: len(ref)}
            times = common.interleaved({ZARR: lambda z=zloader: _groups(z), SPLIT: lambda z=split: _epoch(z),
                                        REF: lambda r=rloader: _epoch(r)}, args.reps)
            for name, ts in times.items():
                batches = -(-samples[name] // B)
                per_batch[n, name] = [1e3 * t / batches for t in ts]
                rate[n, name] = samples[name] / common.median(ts)
                rows.append([f"{n}x{n}x{args.det}x{args.det}", name, samples[name], batches,
                             common.spread(per_batch[n, name]), common.fmt_rate(rate[n, name])])
            del cube, ref, rloader, zloader, split
    print(f"loader benchmark: batch {B}, blend beta {args.beta}, tile {args.tile}, {args.workers} worker(s), "
          f"{args.reps} epochs per contender in turns; ms/batch as median (min-max)")
    print(common.table(["cube", "loader", "samples/epoch", "batches", "ms/batch", "samples/s"], rows))
    small, large = args.scans
    for name in (ZARR, SPLIT, REF):
        growth = common.median(per_batch[large, name]) / common.median(per_batch[small, name])
        print(f"per-batch cost {large}x{large} / {small}x{small} ({(large / small) ** 2:g}x the positions), "
              f"{name}: {growth:.2f}x")
    print(f"patterns copied to the device per sample: zarr tiles {shipped[large]:.2f}, in-memory reference 9")
    cpu = rate[large, SPLIT] / rate[large, REF]
    print(f"samples/s zarr tiles + CPU split / in-memory reference: {cpu:.2f}x at {large}x{large}")
    small_ratio = rate[small, ZARR] / rate[small, REF]
    ratio = rate[large, ZARR] / rate[large, REF]
    print(f"samples/s zarr tiles / in-memory reference: {small_ratio:.2f}x at {small}x{small}, "
          f"{ratio:.2f}x at {large}x{large}")
    print(f"loader ratio {ratio:.2f} (goal >= {GOAL:g})")
    return 0


def single_threaded() -> None:
    """One thread for torch, Blosc and Zarr's codec pool: both loaders get one core, as in a worker."""
    import numcodecs.blosc

    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})
