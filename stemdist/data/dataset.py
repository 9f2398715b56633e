"""Sharded neighbour-patch dataset: scan tiles read lazily from Zarr, split over ranks and loader workers.

Per epoch, the tiles are put in an order seeded by ``(seed, cycle, epoch)`` (all ranks agree without
talking; a walk over bands of tiles that keeps halo reads in the chunk cache) and their samples laid end
to end in one stream. Shard ``s`` of ``S = world_size x workers`` takes stream positions ``[s·N·B,
(s+1)·N·B)`` modulo the stream length, where ``N`` batches of ``B`` samples is the least that covers the
stream. So every sample is visited once per epoch, each shard yields exactly ``N`` full batches (no DDP
hang), and the ``S·N·B - total`` extra samples wrap to the start of the stream. Each worker mixes the
samples of ``shuffle_tiles`` tiles at a time.

A loader worker fills its groups into a ring of shared-memory buffers that it reuses once the consumer
has released them (:meth:`NeighbourPatches.release`, called by the trainer's ``Batches``): a fresh shared
buffer per group costs a page fault per 4 kB and held a worker to ~1 GB/s. A buffer that is not yet released
is never overwritten: the worker takes a fresh one instead (slower, never wrong).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from .tiles import BlockReader, Borders, Grid, flat_index, tile_of, tile_positions

BAND = 2  # tile columns per band of the epoch's walk: its 3 rows x (BAND + 2) halo chunks fit data.cache_chunks
RING_SPARE = 1  # shared buffers per worker beyond its prefetched groups (the one the consumer holds)
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


Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def split_group(group: Group) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches ``(neighbours (B, m, P, Q), centres (B, 1, P, Q))`` of one yielded group.

    Runs where the group's tensors are: after one copy to the GPU, the m-times larger neighbour stacks are
    built there by indexing, and never cross the host-device link.
    """
    patterns, index, targets = group[:3]
    for b in range(len(index)):
        x = patterns[index[b, :, :-1]]
        y = patterns[index[b, :, -1]] if targets.numel() == 0 else targets[b]
        yield x, y[:, None]


class NeighbourPatches(IterableDataset):
    """Yields groups of training batches, each ``(patterns (U, P, Q), index (n, B, m + 1), targets, buffer)``.

    ``patterns`` are the halo blocks of ``shuffle_tiles`` tiles, flattened (each pattern once);
    ``index[b]`` holds, per sample of batch ``b``, the rows of its ``m`` neighbours (8 for ``halo`` 1, 24
    for 2) and its centre;
    :func:`split_group` turns a group into ``n`` batches of ready tensors. ``raw`` and ``den`` are Zarr
    array paths; the training cube is ``(1 - beta) raw + beta den``, computed on the fly. Targets are the
    centres of the same blend (``target="mix"``, ``targets`` empty) or of ``raw`` (``targets`` (n, B, P, Q)).
    ``buffer`` names the worker's shared buffer holding ``patterns`` and ``targets``: hand it to
    :meth:`release` once the group is used up. ``holdout`` (flat scan indices, sorted;
    :func:`stemdist.data.tiles.holdout_positions`) are never targets; with ``heldout`` they are the only ones
    (the validation set: its order is epoch 0's in every epoch).
    """

    def __init__(self, raw: str, den: str | None = None, beta: float = 0.0, *, batch_size: int = 32,
                 borders: Borders = "reflect", target: str = "mix", shuffle_tiles: int = 4,
                 cache_chunks: int = 12, num_workers: int = 0, seed: int = 0, cycle: int = 0,
                 rank: int = 0, world_size: int = 1, prefetch_factor: int = 2, halo: int = 1,
                 holdout: np.ndarray | None = None, heldout: bool = False):
        super().__init__()
        self.raw, self.den, self.beta = str(raw), None if den is None else str(den), float(beta)
        arr = zarr.open_array(self.raw, mode="r")
        self.grid = Grid.of(arr, halo)
        self.batch_size, self.borders, self.target = batch_size, borders, target
        self.shuffle_tiles, self.cache_chunks = shuffle_tiles, cache_chunks
        self.num_workers, self.seed, self.cycle = num_workers, seed, cycle
        self.rank, self.world_size = rank, world_size
        self.holdout, self.heldout = holdout, heldout
        self.counts = self.grid.sample_counts(borders)
        if holdout is not None:
            held = np.bincount(tile_of(self.grid, holdout), minlength=self.grid.n_tiles)
            self.counts = held if heldout else self.counts - held
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers
        # per worker, which of its reusable buffers the consumer still holds (set by workers, cleared by release)
        self._held = torch.zeros(max(1, num_workers), prefetch_factor + RING_SPARE, dtype=torch.int8).share_memory_()
        self._ring: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # a worker's own buffers

    @property
    def n_shards(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Before an epoch: every group of the last one is used up, so every buffer is free again."""
        self._epoch[0] = epoch
        self._held.zero_()

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
            self.release(group)

    def release(self, group: Group) -> None:
        """The consumer is done with ``group``: its worker may refill the buffer that holds it."""
        worker, slot = (int(v) for v in group[3])
        if slot >= 0:
            self._held[worker, slot] = 0

    def _buffers(self, worker: int | None, n_patterns: int, n_batches: int, P: int, Q: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Buffers for a group's patterns and (``target="raw"``) targets, and their ring slot: in a loader
        worker a released buffer of its ring (made once, at the largest group's size) or, when the consumer
        holds them all, fresh shared memory (slot -1); in the main process plain memory (slot -1)."""
        raw_targets = self.target == "raw" and self.den is not None and self.beta != 0.0
        if worker is None:  # numpy's allocation: huge pages, far fewer page faults than torch.empty
            return (torch.from_numpy(np.empty((n_patterns, P, Q), np.float32)),
                    torch.from_numpy(np.empty((n_batches, self.batch_size, P, Q), np.float32))
                    if raw_targets else None, -1)
        free = torch.nonzero(self._held[worker] == 0)
        if len(free) == 0:
            return (torch.empty((n_patterns, P, Q)).share_memory_(),
                    torch.empty((n_batches, self.batch_size, P, Q)).share_memory_() if raw_targets else None, -1)
        slot = int(free[0])
        if not self._ring:
            self._ring = [None] * self._held.shape[1]
        if self._ring[slot] is None:  # the largest group: all its tiles' blocks plus a carried partial batch
            g, B = self.grid, self.batch_size
            most = self.shuffle_tiles * g.slot[0] * g.slot[1] + (len(g.offsets) + 1) * (B - 1)
            self._ring[slot] = (torch.empty((most, P, Q)).share_memory_(),
                                torch.empty((-(-most // B), B, P, Q)).share_memory_() if raw_targets else None)
        self._held[worker, slot] = 1
        pat, tgt = self._ring[slot]
        return pat[:n_patterns], None if tgt is None else tgt[:n_batches], slot

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
        yield from self._groups(segments, rng, None if info is None else worker)

    def _groups(self, segments: list[Segment], rng: np.random.Generator, worker: int | None) -> Iterator[Group]:
        """Groups of ``shuffle_tiles`` tiles, their samples shuffled together; the samples that do not fill
        a last batch are carried (as their m + 1 patterns) into the next group, so every batch is full."""
        mix, target = self._readers()
        B, g = self.batch_size, self.grid
        slot, m1 = g.slot, len(g.offsets) + 1
        P, Q = mix.raw.shape[2:]
        carry = np.zeros((0, m1, P, Q), np.float32)  # patterns of carried samples
        carry_t = np.zeros((0, P, Q), np.float32)  # their targets (from ``raw``)
        for g0 in range(0, len(segments), self.shuffle_tiles):
            group = segments[g0:g0 + self.shuffle_tiles]
            n_blocks = len(group) * slot[0] * slot[1]
            k, i, j = [], [], []
            for n, (t, a, b) in enumerate(group):
                ti, tj = tile_positions(g, t, self.borders, self.holdout, self.heldout)
                i.append(ti[a:b])
                j.append(tj[a:b])
                k.append(np.full(b - a, n))
            k, i, j = (np.concatenate(v) for v in (k, i, j))
            perm = rng.permutation(len(k))
            index = flat_index(k[perm], i[perm], j[perm], slot, g.halo)
            index = np.concatenate([n_blocks + np.arange(carry.shape[0] * m1).reshape(-1, m1), index])
            full = len(index) // B * B
            # one buffer: the group's halo blocks, then the carried samples' patterns (shared memory in a
            # loader worker: the DataLoader passes it on without another copy)
            patterns, targets, ring = self._buffers(worker, n_blocks + carry.shape[0] * m1, full // B, P, Q)
            buf = patterns.numpy()
            blocks = buf[:n_blocks].reshape(len(group), *slot, P, Q)
            buf[n_blocks:] = carry.reshape(-1, P, Q)
            for n, (t, _, _) in enumerate(group):
                mix.block(t, blocks[n])
            rest = index[full:]
            carry = buf[rest]
            if target is not None:
                tblocks = np.empty_like(blocks)
                for n, (t, _, _) in enumerate(group):
                    target.block(t, tblocks[n])
                centres = np.concatenate([carry_t, tblocks.reshape(-1, P, Q)[index[len(carry_t):, -1]]])
                targets.numpy().reshape(-1, P, Q)[:] = centres[:full]
                carry_t = centres[full:]
            tag = torch.tensor([-1 if worker is None else worker, ring])
            if full == 0:
                self.release((patterns, None, None, tag))
                continue
            yield patterns, torch.from_numpy(index[:full].reshape(-1, B, m1)), \
                (targets if targets is not None else torch.zeros(0)), tag
        if len(carry):
            raise RuntimeError(f"shard ended with a partial batch of {len(carry)} samples")
