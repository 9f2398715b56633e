"""Sharded neighbour-patch dataset: scan tiles read lazily from Zarr, split over ranks and loader workers.

Per epoch, the tiles are put in an order seeded by ``(seed, cycle, epoch)`` (all ranks agree without
talking; a walk over bands of tiles that keeps halo reads in the chunk cache) and their samples laid end
to end in one stream. Shard ``s`` of ``S = world_size x workers`` takes stream positions ``[s·N·B,
(s+1)·N·B)`` modulo the stream length, where ``N`` batches of ``B`` samples is the least that covers the
stream. So every sample is visited once per epoch, each shard yields exactly ``N`` full batches (no DDP
hang), and the ``S·N·B - total`` extra samples wrap to the start of the stream. Each worker mixes the
samples of ``shuffle_tiles`` tiles at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from .tiles import BlockReader, Borders, Grid, flat_index, tile_positions

BAND = 4  # tile columns per band of the epoch's walk
Segment = tuple[int, int, int]  # (tile, first sample, end sample) in the tile's raster order


def epoch_order(grid: Grid, seed: int, cycle: int, epoch: int, band: int = BAND) -> np.ndarray:
    """The epoch's tile order: bands of ``band`` tile columns in random order, each walked row by row
    (random direction, random order within a row).

    A walk keeps the chunks of three tile rows of one band in the reader's cache, so a tile's halo
    rarely costs another decode (about ``(band + 2) / band`` decodes per tile, against up to 9 for a
    fully random order), while every epoch still visits the scan in a new order.
    """
    rng = np.random.default_rng([seed, cycle, epoch])
    ny, nx = grid.shape
    order = []
    for b in rng.permutation(-(-nx // band)):
        cols = np.arange(b * band, min((b + 1) * band, nx))
        rows = np.arange(ny) if rng.random() < 0.5 else np.arange(ny)[::-1]
        for r in rows:
            order.extend(r * nx + rng.permutation(cols))
    return np.asarray(order, dtype=np.int64)


@dataclass(frozen=True)
class ShardPlan:
    segments: list[list[Segment]]  # per shard
    batches: int  # per shard
    total: int  # distinct samples per epoch
    repeats: int  # extra samples added so that every shard has ``batches`` full batches


def plan_shards(counts: np.ndarray, order: np.ndarray, n_shards: int, batch_size: int) -> ShardPlan:
    """Split the stream of samples (tiles in ``order``) into ``n_shards`` equal runs of full batches."""
    counts = np.asarray(counts)[order]
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no training samples: the scan has no position with 8 neighbours")
    batches = math.ceil(total / (n_shards * batch_size))
    per_shard = batches * batch_size
    starts = np.concatenate([[0], np.cumsum(counts)])
    segments: list[list[Segment]] = []
    for s in range(n_shards):
        pos, end, shard = s * per_shard, (s + 1) * per_shard, []
        while pos < end:
            p = pos % total
            k = int(np.searchsorted(starts, p, side="right") - 1)
            take = min(int(starts[k + 1]) - p, end - pos)
            a = p - int(starts[k])
            shard.append((int(order[k]), a, a + take))
            pos += take
        segments.append(shard)
    return ShardPlan(segments, batches, total, n_shards * per_shard - total)


Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def split_group(group: Group) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches ``(neighbours (B, 8, P, Q), centres (B, 1, P, Q))`` of one yielded group.

    Runs where the group's tensors are: after one copy to the GPU, the 9x larger neighbour stacks are
    built there by indexing, and never cross the host-device link.
    """
    patterns, index, targets = group
    for b in range(len(index)):
        x = patterns[index[b, :, :8]]
        y = patterns[index[b, :, 8]] if targets.numel() == 0 else targets[b]
        yield x, y[:, None]


class NeighbourPatches(IterableDataset):
    """Yields groups of training batches, each ``(patterns (U, P, Q), index (n, B, 9), targets)``.

    ``patterns`` are the halo blocks of ``shuffle_tiles`` tiles, flattened (each pattern once);
    ``index[b]`` holds, per sample of batch ``b``, the rows of its 8 neighbours and its centre;
    :func:`split_group` turns a group into ``n`` batches of ready tensors. ``raw`` and ``den`` are Zarr
    array paths; the training cube is ``(1 - beta) raw + beta den``, computed on the fly. Targets are the
    centres of the same blend (``target="mix"``, ``targets`` empty) or of ``raw`` (``targets`` (n, B, P, Q)).
    """

    def __init__(self, raw: str, den: str | None = None, beta: float = 0.0, *, batch_size: int = 32,
                 borders: Borders = "reflect", target: str = "mix", shuffle_tiles: int = 4,
                 cache_chunks: int = 24, num_workers: int = 0, seed: int = 0, cycle: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.raw, self.den, self.beta = str(raw), None if den is None else str(den), float(beta)
        arr = zarr.open_array(self.raw, mode="r")
        self.grid = Grid.of(arr)
        self.batch_size, self.borders, self.target = batch_size, borders, target
        self.shuffle_tiles, self.cache_chunks = shuffle_tiles, cache_chunks
        self.num_workers, self.seed, self.cycle = num_workers, seed, cycle
        self.rank, self.world_size = rank, world_size
        self.counts = self.grid.sample_counts(borders)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers

    @property
    def n_shards(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def plan(self, epoch: int) -> ShardPlan:
        order = epoch_order(self.grid, self.seed, self.cycle, epoch)
        return plan_shards(self.counts, order, self.n_shards, self.batch_size)

    def __len__(self) -> int:
        """Batches per rank and epoch (the same on every rank), summed over all groups."""
        return self.plan(0).batches * max(1, self.num_workers)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches, split here (single process, CPU: tests and tools)."""
        for group in self:
            yield from split_group(group)

    def _readers(self) -> tuple[BlockReader, BlockReader | None]:
        raw = zarr.open_array(self.raw, mode="r")
        den = None if self.den is None else zarr.open_array(self.den, mode="r")
        mix = BlockReader(raw, den, self.beta, self.cache_chunks, self.grid)
        if self.target == "raw" and den is not None and self.beta != 0.0:
            return mix, BlockReader(raw, None, 0.0, self.cache_chunks, self.grid)
        return mix, None

    def __iter__(self) -> Iterator[Group]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch = int(self._epoch[0])
        shard = self.rank * max(1, self.num_workers) + worker
        segments = self.plan(epoch).segments[shard]
        rng = np.random.default_rng([self.seed, self.cycle, epoch, shard, 1])
        yield from self._groups(segments, rng, shared=info is not None)

    def _groups(self, segments: list[Segment], rng: np.random.Generator, shared: bool) -> Iterator[Group]:
        """Groups of ``shuffle_tiles`` tiles, their samples shuffled together; the samples that do not fill
        a last batch are carried (as their 9 patterns) into the next group, so every batch is full."""
        mix, target = self._readers()
        B, g = self.batch_size, self.grid
        slot = (g.ty + 2, g.tx + 2)
        P, Q = mix.raw.shape[2:]
        carry = np.zeros((0, 9, P, Q), np.float32)  # patterns of carried samples
        carry_t = np.zeros((0, P, Q), np.float32)  # their targets (from ``raw``)
        for g0 in range(0, len(segments), self.shuffle_tiles):
            group = segments[g0:g0 + self.shuffle_tiles]
            n_blocks = len(group) * slot[0] * slot[1]
            # one buffer: the group's halo blocks, then the carried samples' patterns; in shared memory
            # when made in a loader worker (the DataLoader then passes it on without another copy)
            shape = (n_blocks + carry.size // (P * Q), P, Q)
            if shared:
                patterns = torch.empty(shape, dtype=torch.float32).share_memory_()
            else:  # numpy's allocation: huge pages, far fewer page faults than torch.empty
                patterns = torch.from_numpy(np.empty(shape, dtype=np.float32))
            buf = patterns.numpy()
            blocks = buf[:n_blocks].reshape(len(group), *slot, P, Q)
            buf[n_blocks:] = carry.reshape(-1, P, Q)
            k, i, j = [], [], []
            for n, (t, a, b) in enumerate(group):
                mix.block(t, blocks[n])
                ti, tj = tile_positions(g, t, self.borders)
                i.append(ti[a:b])
                j.append(tj[a:b])
                k.append(np.full(b - a, n))
            k, i, j = (np.concatenate(v) for v in (k, i, j))
            perm = rng.permutation(len(k))
            index = flat_index(k[perm], i[perm], j[perm], slot)
            index = np.concatenate([n_blocks + np.arange(carry.shape[0] * 9).reshape(-1, 9), index])
            if target is not None:
                tblocks = np.empty_like(blocks)
                for n, (t, _, _) in enumerate(group):
                    target.block(t, tblocks[n])
                centres = tblocks.reshape(-1, P, Q)[index[len(carry):, 8]]
                targets = np.concatenate([carry_t, centres])
            full = len(index) // B * B
            rest = index[full:]
            carry = buf[rest]
            if target is not None:
                carry_t = targets[full:]
            if full == 0:
                continue
            tt = (torch.from_numpy(targets[:full].reshape(-1, B, P, Q)) if target is not None
                  else torch.zeros(0))
            yield patterns, torch.from_numpy(index[:full].reshape(-1, B, 9)), tt
        if len(carry):
            raise RuntimeError(f"shard ended with a partial batch of {len(carry)} samples")
