"""What is computed per scan tile: tile geometry, halo reads with the cycle blend, neighbour gathers.

Nothing here knows about ranks, loader workers or GPUs; the dataset and the inference pass decide
*where* tiles are processed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import zarr

from ..io.zarr_store import ChunkReader

Borders = Literal["reflect", "copy"]


def neighbour_offsets(halo: int = 1) -> np.ndarray:
    """``(di, dj)`` of the neighbours in a ``(2 halo + 1)``-wide window, raster order, the centre left out:
    the network's input channels (``halo`` 1: the reference's 8; 2: the 24 of a 5 x 5 window)."""
    d = np.arange(-halo, halo + 1)
    di, dj = np.meshgrid(d, d, indexing="ij")
    keep = (di != 0) | (dj != 0)
    return np.stack([di[keep], dj[keep]], axis=1)


OFFSETS = neighbour_offsets(1)  # the reference's channel order


@dataclass(frozen=True)
class Grid:
    """A scan of ``H x W`` positions cut into tiles of ``ty x tx`` (the Zarr chunks over the scan), each read
    with ``halo`` positions of its neighbours on every side (the blind spot's window is ``2 halo + 1`` wide)."""

    H: int
    W: int
    ty: int
    tx: int
    halo: int = 1

    @classmethod
    def of(cls, arr: zarr.Array, halo: int = 1) -> Grid:
        return cls(arr.shape[0], arr.shape[1], arr.chunks[0], arr.chunks[1], halo)

    @property
    def slot(self) -> tuple[int, int]:
        """Positions of the largest tile with its halo."""
        return self.ty + 2 * self.halo, self.tx + 2 * self.halo

    @property
    def offsets(self) -> np.ndarray:
        """The neighbours' ``(di, dj)``, in channel order."""
        return neighbour_offsets(self.halo)

    @property
    def tile(self) -> tuple[int, int]:
        """``(ty, tx)``: the scan extent of one chunk."""
        return self.ty, self.tx

    @property
    def shape(self) -> tuple[int, int]:
        return -(-self.H // self.ty), -(-self.W // self.tx)

    @property
    def n_tiles(self) -> int:
        return self.shape[0] * self.shape[1]

    def bounds(self, t: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of tile ``t`` (raster order)."""
        cy, cx = divmod(int(t), self.shape[1])
        return cy * self.ty, min((cy + 1) * self.ty, self.H), cx * self.tx, min((cx + 1) * self.tx, self.W)

    def sample_box(self, t: int, borders: Borders) -> tuple[int, int, int, int]:
        """Positions of tile ``t`` that are training samples (all, or those with every neighbour inside the
        scan for ``copy``)."""
        y0, y1, x0, x1 = self.bounds(t)
        if borders == "copy":
            r = self.halo
            y0, y1, x0, x1 = max(y0, r), min(y1, self.H - r), max(x0, r), min(x1, self.W - r)
        return y0, max(y0, y1), x0, max(x0, x1)

    def n_samples(self, t: int, borders: Borders) -> int:
        y0, y1, x0, x1 = self.sample_box(t, borders)
        return (y1 - y0) * (x1 - x0)

    def sample_counts(self, borders: Borders) -> np.ndarray:
        return np.array([self.n_samples(t, borders) for t in range(self.n_tiles)], dtype=np.int64)


class BlockReader:
    """Reads scan blocks with a halo (``grid.halo`` positions) of ``(1 - beta) * raw + beta * den`` as float32.

    Whole chunks are decoded and kept in a small LRU cache (in the input's dtype when nothing is
    blended), so the halo rows that a tile borrows from its neighbours cost no extra decode when those
    neighbours are read next. Memory is bounded by ``cache_chunks`` chunks; evicted chunk buffers are
    reused (fresh pages cost as much as decoding).
    """

    def __init__(self, raw: zarr.Array, den: zarr.Array | None = None, beta: float = 0.0,
                 cache_chunks: int = 12, grid: Grid | None = None):
        self.raw, self.den, self.beta = raw, den, float(beta)
        if den is not None and den.shape != raw.shape:
            raise ValueError(f"blend arrays differ in shape: {raw.shape} vs {den.shape}")
        self.grid = g = grid or Grid.of(raw)
        self.blend = den is not None and self.beta != 0.0
        self.chunk_shape = (g.ty, g.tx) + tuple(raw.shape[2:])
        self.sources = [ChunkReader(raw, self.chunk_shape)] + ([ChunkReader(den, self.chunk_shape)]
                                                                if self.blend else [])
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.cache_chunks = max(1, cache_chunks)
        self._free: list[np.ndarray] = []  # evicted float32 chunk buffers
        self._scratch: dict[str, np.ndarray] = {}  # per-dtype decode buffers, reused

    def _buffer(self, name: str, dtype: np.dtype) -> np.ndarray:
        buf = self._scratch.get(name)
        if buf is None or buf.dtype != dtype:
            buf = self._scratch[name] = np.empty(self.chunk_shape, dtype)
        return buf

    def _decode(self, cy: int, cx: int) -> np.ndarray:
        """Chunk ``(cy, cx)`` of the blend, full chunk shape (edge chunks padded), in a reused buffer: the
        input's own dtype when there is nothing to blend and it is at most 4 bytes (a uint16 cache holds half
        a float32 one's bytes; blocks are cast when assembled), float32 otherwise."""
        raw = self.sources[0]
        if not self.blend and raw.dtype.itemsize <= 4:
            return raw.read(cy, cx, self._free.pop() if self._free else np.empty(self.chunk_shape, raw.dtype))
        out = self._free.pop() if self._free else np.empty(self.chunk_shape, np.float32)
        counts = raw.read(cy, cx, self._buffer("raw", raw.dtype))
        if not self.blend:
            np.copyto(out, counts, casting="unsafe")
            return out
        den = self.sources[1]
        mix = den.read(cy, cx, out if den.dtype == np.float32 else self._buffer("den", den.dtype))
        if mix is not out:
            np.copyto(out, mix, casting="unsafe")
        tmp = self._buffer("tmp", np.dtype(np.float32))
        np.copyto(tmp, counts, casting="unsafe")
        t = torch.from_numpy(out)
        torch.lerp(torch.from_numpy(tmp), t, self.beta, out=t)  # (1 - beta) raw + beta den, one pass
        return out

    def _chunk(self, cy: int, cx: int) -> np.ndarray:
        """The valid part of blended chunk ``(cy, cx)``, from the cache or decoded into it."""
        key = (cy, cx)
        if key in self.cache:
            self.cache.move_to_end(key)
            full = self.cache[key]
        else:
            full = self.cache[key] = self._decode(cy, cx)
            if len(self.cache) > self.cache_chunks:
                self._free.append(self.cache.popitem(last=False)[1])
        g = self.grid
        return full[:min(g.ty, g.H - cy * g.ty), :min(g.tx, g.W - cx * g.tx)]

    def region(self, y0: int, y1: int, x0: int, x1: int, out: np.ndarray | None = None) -> np.ndarray:
        """The blended cube over ``[y0, y1) x [x0, x1)`` (inside the scan), assembled from chunks (into
        ``out`` when given)."""
        g = self.grid
        if out is None:
            out = np.empty((y1 - y0, x1 - x0) + tuple(self.raw.shape[2:]), dtype=np.float32)
        for cy in range(y0 // g.ty, (y1 - 1) // g.ty + 1):
            for cx in range(x0 // g.tx, (x1 - 1) // g.tx + 1):
                chunk = self._chunk(cy, cx)
                cy0, cx0 = cy * g.ty, cx * g.tx
                ya, yb = max(y0, cy0), min(y1, cy0 + chunk.shape[0])
                xa, xb = max(x0, cx0), min(x1, cx0 + chunk.shape[1])
                out[ya - y0:yb - y0, xa - x0:xb - x0] = chunk[ya - cy0:yb - cy0, xa - cx0:xb - cx0]
        return out

    def block(self, t: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tile ``t`` with a halo of ``r = grid.halo`` positions on every side, ``(h + 2r, w + 2r, P, Q)`` for
        a tile of ``h x w`` positions (written into the top-left corner of ``out`` when given).

        Halo positions outside the scan are filled by reflection (index -k -> k, H - 1 + k -> H - 1 - k), so
        a border position's missing neighbours are real, distinct patterns and never the centre itself.
        """
        g = self.grid
        r = g.halo
        y0, y1, x0, x1 = g.bounds(t)
        h, w = y1 - y0 + 2 * r, x1 - x0 + 2 * r
        if out is None:
            out = np.empty((h, w) + tuple(self.raw.shape[2:]), dtype=np.float32)
        ya, yb, xa, xb = max(y0 - r, 0), min(y1 + r, g.H), max(x0 - r, 0), min(x1 + r, g.W)
        top, left = ya - (y0 - r), xa - (x0 - r)  # halo rows / columns outside the scan
        bottom, right = y1 + r - yb, x1 + r - xb
        self.region(ya, yb, xa, xb, out[top:top + yb - ya, left:left + xb - xa])
        # reflect rows, then columns (so corners reflect twice, as numpy.pad does); block index of scan
        # row y is y - y0 + r
        cols = slice(left, left + xb - xa)
        for k in range(1, top + 1):  # scan row -k <- row k
            out[r - y0 - k, cols] = out[r - y0 + k, cols]
        for k in range(1, bottom + 1):  # scan row H - 1 + k <- row H - 1 - k
            out[g.H - 1 + k - y0 + r, cols] = out[g.H - 1 - k - y0 + r, cols]
        for k in range(1, left + 1):
            out[:h, r - x0 - k] = out[:h, r - x0 + k]
        for k in range(1, right + 1):
            out[:h, g.W - 1 + k - x0 + r] = out[:h, g.W - 1 - k - x0 + r]
        return out[:h, :w]


def flat_index(k: np.ndarray, i: np.ndarray, j: np.ndarray, slot: tuple[int, int], halo: int = 1) -> np.ndarray:
    """``(n, m + 1)`` indices of the ``m`` neighbours (in :func:`neighbour_offsets` order) and the centre of
    positions ``(i, j)`` of blocks ``k``, into blocks of ``slot`` positions (a tile with its halo) flattened
    to one list of patterns: the neighbour gather becomes one indexing op wherever the patterns are (the GPU)."""
    window = np.concatenate([neighbour_offsets(halo), [(0, 0)]])  # the neighbours, then the centre
    ii = i[:, None] + halo + window[None, :, 0]
    jj = j[:, None] + halo + window[None, :, 1]
    return (k[:, None] * slot[0] + ii) * slot[1] + jj


def tile_positions(grid: Grid, t: int, borders: Borders, holdout: np.ndarray | None = None,
                   heldout: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raster-ordered sample positions of tile ``t``, as indices inside the tile: all of them, or with
    ``holdout`` (flat scan indices, sorted) those not in it, or with ``heldout`` only those in it."""
    y0, _, x0, _ = grid.bounds(t)
    sy0, sy1, sx0, sx1 = grid.sample_box(t, borders)
    ii, jj = np.meshgrid(np.arange(sy0, sy1) - y0, np.arange(sx0, sx1) - x0, indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    if holdout is None or (len(holdout) == 0 and not heldout):
        return ii, jj
    keep = np.isin((ii + y0) * grid.W + (jj + x0), holdout) == heldout
    return ii[keep], jj[keep]


def tile_of(grid: Grid, flat: np.ndarray) -> np.ndarray:
    """Tile index (raster order) of each flat scan index ``y * W + x``."""
    y, x = np.divmod(np.asarray(flat, np.int64), grid.W)
    return (y // grid.ty) * grid.shape[1] + x // grid.tx


HOLDOUT_MOST = 4096  # held-out positions at most: validation costs the same on any scan
HOLDOUT_TILES = 64  # and they lie in at most this many tiles: each epoch's validation reads only those


def holdout_positions(grid: Grid, borders: Borders, fraction: float, seed: int) -> np.ndarray:
    """Flat scan indices (``y * W + x``, sorted) of the positions that are never training targets
    (``train.holdout``): ``fraction`` of the sample positions, at most :data:`HOLDOUT_MOST`, drawn at random
    (seeded) from at most :data:`HOLDOUT_TILES` random tiles. They stay inputs (neighbours of other targets);
    the network's loss on them measures what it learnt rather than what noise it memorised."""
    counts = grid.sample_counts(borders)
    n = min(HOLDOUT_MOST, int(round(fraction * counts.sum())))
    if n <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 7])
    tiles = np.flatnonzero(counts)
    tiles = np.sort(rng.permutation(tiles)[:HOLDOUT_TILES]) if len(tiles) > HOLDOUT_TILES else tiles
    flat = []
    for t in tiles:
        y0, _, x0, _ = grid.bounds(t)
        i, j = tile_positions(grid, t, borders)
        flat.append((i + y0) * grid.W + (j + x0))
    flat = np.concatenate(flat)
    return np.sort(rng.choice(flat, size=min(n, len(flat) // 2), replace=False))


def fold_of(flat: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The cross-fitting fold (``train.crossfit``) of each flat scan index ``y * W + x``: a seeded hash
    (SplitMix64) modulo ``folds``, so any rank or tile finds a position's fold without a map of the scan."""
    with np.errstate(over="ignore"):
        z = np.asarray(flat, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) % np.uint64(folds)).astype(np.int64)


def fold_positions(grid: Grid, borders: Borders, fold: int, folds: int, seed: int) -> np.ndarray:
    """Flat scan indices (sorted) of the sample positions in cross-fitting fold ``fold`` of ``folds``: the
    targets network ``fold`` never trains on and alone predicts."""
    flat = []
    for t in range(grid.n_tiles):
        y0, _, x0, _ = grid.bounds(t)
        i, j = tile_positions(grid, t, borders)
        f = (i + y0) * grid.W + (j + x0)
        flat.append(f[fold_of(f, folds, seed) == fold])
    return np.sort(np.concatenate(flat)) if flat else np.zeros(0, np.int64)
