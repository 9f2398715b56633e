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
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from .tiles import BlockReader, Borders, Grid, gather_centres, gather_neighbours, tile_positions

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


class NeighbourPatches(IterableDataset):
    """Yields ready batches ``(neighbours (B, 8, P, Q), centres (B, 1, P, Q))`` as float32 tensors.

    ``raw`` and ``den`` are Zarr array paths; the training cube is ``(1 - beta) raw + beta den``,
    computed on the fly. Targets come from the same blend (``target="mix"``) or from ``raw``.
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
        """Batches per rank and epoch (the same on every rank)."""
        return self.plan(0).batches * max(1, self.num_workers)

    def _readers(self) -> tuple[BlockReader, BlockReader | None]:
        raw = zarr.open_array(self.raw, mode="r")
        den = None if self.den is None else zarr.open_array(self.den, mode="r")
        mix = BlockReader(raw, den, self.beta, self.cache_chunks, self.grid)
        if self.target == "raw" and den is not None and self.beta != 0.0:
            return mix, BlockReader(raw, None, 0.0, self.cache_chunks, self.grid)
        return mix, None

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch = int(self._epoch[0])
        shard = self.rank * max(1, self.num_workers) + worker
        segments = self.plan(epoch).segments[shard]
        rng = np.random.default_rng([self.seed, self.cycle, epoch, shard, 1])
        yield from self._batches(segments, rng)

    def _batches(self, segments: list[Segment], rng: np.random.Generator):
        mix, target = self._readers()
        B, g = self.batch_size, self.grid
        left_x = left_y = None
        for g0 in range(0, len(segments), self.shuffle_tiles):
            group = segments[g0:g0 + self.shuffle_tiles]
            xs = self._stack([mix.block(t) for t, _, _ in group])
            ys = xs if target is None else self._stack([target.block(t) for t, _, _ in group])
            k, i, j = [], [], []
            for n, (t, a, b) in enumerate(group):
                ti, tj = tile_positions(g, t, self.borders)
                i.append(ti[a:b])
                j.append(tj[a:b])
                k.append(np.full(b - a, n))
            k, i, j = (np.concatenate(v) for v in (k, i, j))
            perm = rng.permutation(len(k))
            k, i, j = k[perm], i[perm], j[perm]
            start = 0
            if left_x is not None:  # complete the batch carried over from the previous group
                need = B - len(left_x)
                x = gather_neighbours(xs, k[:need], i[:need], j[:need])
                y = gather_centres(ys, k[:need], i[:need], j[:need])
                left_x, left_y = np.concatenate([left_x, x]), np.concatenate([left_y, y])
                start = need
                if len(left_x) == B:
                    yield torch.from_numpy(left_x), torch.from_numpy(left_y)
                    left_x = left_y = None
                else:
                    continue
            for s in range(start, len(k), B):
                sl = slice(s, min(s + B, len(k)))
                x = gather_neighbours(xs, k[sl], i[sl], j[sl])
                y = gather_centres(ys, k[sl], i[sl], j[sl])
                if len(x) == B:
                    yield torch.from_numpy(x), torch.from_numpy(y)
                else:
                    left_x, left_y = x, y
        if left_x is not None:
            raise RuntimeError(f"shard ended with a partial batch of {len(left_x)} samples")

    def _stack(self, blocks: list[np.ndarray]) -> np.ndarray:
        """Stack halo blocks of (possibly smaller) edge tiles into one ``(K, ty+2, tx+2, P, Q)`` array."""
        g = self.grid
        if all(b.shape[:2] == (g.ty + 2, g.tx + 2) for b in blocks):
            return np.stack(blocks)
        out = np.zeros((len(blocks), g.ty + 2, g.tx + 2) + blocks[0].shape[2:], dtype=np.float32)
        for n, b in enumerate(blocks):
            out[n, :b.shape[0], :b.shape[1]] = b
        return out
