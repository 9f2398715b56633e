"""Distributed inference: each rank predicts and writes its own whole chunks of the output cube.

Reading (tiles with halo, blended on the fly), prediction and writing overlap: ``threads`` reader threads
decode tiles ahead (each its own chunk cache), the main thread runs the network on the device, where it
also sums each pattern for the images it returns, and ``threads`` writer threads compress and write
finished chunks (Blosc releases the GIL, so decoding and compression scale with threads). On a GPU the
blocks go up and the chunks come down once per tile, through pinned buffers. No locks are needed
because no two ranks (or threads) ever write the same chunk. Memory: ``2 threads + 2`` halo blocks and
``2 threads`` chunks in flight, and ``cache_chunks`` decoded chunks, whatever the cube's size.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import zarr

from .. import faults
from ..data.tiles import BlockReader, Borders, Grid, flat_index, fold_of, tile_positions
from ..io.zarr_store import ChunkWriter
from . import hardware


def owned_tiles(n_tiles: int, rank: int, world_size: int) -> range:
    """A contiguous run of tiles (whole chunks) per rank: disjoint, covering, and cache-friendly."""
    return range(rank * n_tiles // world_size, (rank + 1) * n_tiles // world_size)


@torch.inference_mode()
def predict_block(model: torch.nn.Module | list[torch.nn.Module], block: torch.Tensor, grid: Grid, t: int,
                  borders: Borders, batch_size: int, device: torch.device, autocast: torch.dtype | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Denoised patterns ``(h, w, P, Q)`` of tile ``t`` from its halo ``block``, on ``device``; with ``copy``
    borders the scan's border positions keep their input patterns. A list of K models (``train.crossfit``):
    each position is predicted by the model of its fold (:func:`stemdist.data.tiles.fold_of` with ``seed``) only."""
    y0, y1, x0, x1 = grid.bounds(t)
    r = grid.halo
    blk = block.to(device, non_blocking=True)
    out = blk[r:y1 - y0 + r, r:x1 - x0 + r].clone()
    # the block's patterns cross to the device once; the neighbour stacks are built there
    patterns = blk.reshape(-1, *blk.shape[2:])
    models = model if isinstance(model, list) else [model]
    # the neighbours, and the centre's own counts as the last channel where the network reads them
    ii, jj, index = _positions(grid, t, borders, device, centre=takes_centre(models[0]))
    rows: list[torch.Tensor | None] = [None]
    if len(models) > 1:
        i, j = tile_positions(grid, t, borders)
        folds = fold_of((i + y0) * grid.W + (j + x0), len(models), seed)
        rows = [torch.from_numpy(np.flatnonzero(folds == k)).to(device) for k in range(len(models))]
    for net, sel in zip(models, rows, strict=True):
        n = len(ii) if sel is None else len(sel)
        for s in range(0, n, batch_size):
            at = slice(s, s + batch_size) if sel is None else sel[s:s + batch_size]
            with hardware.autocast(device, autocast):
                pred = net(patterns[index[at]])
            out[ii[at], jj[at]] = pred[:, 0].float()
    return out


def takes_centre(model: torch.nn.Module) -> bool:
    """Whether the network reads the centre pattern's own counts (``model.centre``) as its last input."""
    net = getattr(model, "net", model)
    net = net.members[0] if hasattr(net, "members") else net
    return bool(getattr(getattr(net, "_orig_mod", net), "centre", False))


_POSITIONS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _positions(grid: Grid, t: int, borders: Borders, device: torch.device, centre: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile ``t``'s sample positions ``ii, jj`` and neighbour index, on the device. Tiles share a handful of
    shapes, so they are made once per shape: a copy from pageable memory would wait for the device."""
    y0, y1, x0, x1 = grid.bounds(t)
    sy0, sy1, sx0, sx1 = grid.sample_box(t, borders)
    r = grid.halo
    key = (y1 - y0, x1 - x0, sy0 - y0, sy1 - y0, sx0 - x0, sx1 - x0, r, str(device), centre)
    if key not in _POSITIONS:
        ii, jj = tile_positions(grid, t, borders)
        index = flat_index(np.zeros_like(ii), ii, jj, (y1 - y0 + 2 * r, x1 - x0 + 2 * r), r)
        index = index if centre else index[:, :-1]
        _POSITIONS[key] = tuple(torch.from_numpy(a).to(device) for a in (ii, jj, index))
    return _POSITIONS[key]


class ReadAhead:
    """Tiles with halo read ahead by ``threads`` threads, each with its own :class:`BlockReader` (and its
    share of the chunk cache), in the order asked for, into reused (pinned, for a GPU) buffers."""

    def __init__(self, raw: zarr.Array, den: zarr.Array | None, beta: float, grid: Grid, cache_chunks: int,
                 threads: int, pin: bool):
        self.args = (raw, den, beta, max(1, cache_chunks // threads), grid)
        self.local = threading.local()
        self.threads, self.grid = threads, grid
        shape = grid.slot + tuple(raw.shape[2:])
        self.free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(2 * threads + 2):
            self.free.put(torch.empty(shape, dtype=torch.float32, pin_memory=pin))

    def _read(self, t: int, buf: torch.Tensor) -> torch.Tensor:
        reader = getattr(self.local, "reader", None)
        if reader is None:
            reader = self.local.reader = BlockReader(*self.args)
        y0, y1, x0, x1 = self.grid.bounds(t)
        reader.block(t, buf.numpy())
        return buf[:y1 - y0 + 2 * self.grid.halo, :x1 - x0 + 2 * self.grid.halo]

    def __call__(self, tiles: range) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(tile, block view, its buffer)``; put the buffer back in :attr:`free` once the block is used."""
        with ThreadPoolExecutor(self.threads, thread_name_prefix="stemdist-read") as pool:
            pending: deque[tuple[int, torch.Tensor, Future]] = deque()
            for t in tiles:
                if len(pending) > self.threads:
                    t0, buf, fut = pending.popleft()
                    yield t0, fut.result(), buf
                buf = self.free.get()  # waits for the device to finish with an earlier block
                pending.append((t, buf, pool.submit(self._read, t, buf)))
            while pending:
                t0, buf, fut = pending.popleft()
                yield t0, fut.result(), buf


def infer(model: torch.nn.Module | list[torch.nn.Module], raw: zarr.Array, den: zarr.Array | None, beta: float,
          out: zarr.Array, *, borders: Borders, batch_size: int, device: torch.device, rank: int = 0,
          world_size: int = 1, cache_chunks: int = 12, autocast: torch.dtype | None = None, progress=None,
          bf_mask: np.ndarray | None = None, threads: int = 2, halo: int = 1, seed: int = 0) -> np.ndarray:
    """Write this rank's chunks of ``out`` = model applied to ``(1 - beta) raw + beta den`` (a list of models:
    each position's cross-fitting fold's, :func:`predict_block`).

    Returns two images of the chunks this rank wrote, zero elsewhere (summed over ranks they are whole, for
    free: no second pass): ``[0]`` the virtual bright-field (counts in ``bf_mask``, or the whole detector),
    ``[1]`` the total counts of every pattern (what the divergence check reads).
    """
    grid = Grid.of(out, halo)  # the output's chunks: each rank writes whole ones
    cuda = device.type == "cuda"
    threads = max(1, threads)
    readers = ReadAhead(raw, den, beta, grid, cache_chunks, threads, pin=cuda)
    tiles = owned_tiles(grid.n_tiles, rank, world_size)
    for net in model if isinstance(model, list) else [model]:
        net.eval()
    mask = None if bf_mask is None else torch.as_tensor(bf_mask, dtype=torch.float32, device=device)
    images = torch.zeros((2, grid.H, grid.W), dtype=torch.float64, device=device)
    chunk = (grid.ty, grid.tx) + tuple(raw.shape[2:])
    chunks = ChunkWriter(out)
    outs = [torch.empty(chunk, dtype=torch.float32, pin_memory=cuda) for _ in range(2 * threads)]

    def write(t: int, buf: torch.Tensor, in_buf: torch.Tensor, done: torch.cuda.Event | None) -> None:
        if done is not None:  # the tile's upload, network and download have run
            done.synchronize()
        readers.free.put(in_buf)
        chunks.write(*divmod(t, grid.shape[1]), buf.numpy())

    with ThreadPoolExecutor(threads, thread_name_prefix="stemdist-write") as writer:
        writes: deque[tuple[Future, torch.Tensor]] = deque()
        for t, block, in_buf in readers(tiles):
            pred = predict_block(model, block, grid, t, borders, batch_size, device, autocast, seed)
            y0, y1, x0, x1 = grid.bounds(t)
            totals = pred.sum(dim=(2, 3), dtype=torch.float64)
            images[1, y0:y1, x0:x1] = totals
            images[0, y0:y1, x0:x1] = totals if mask is None else (pred * mask).sum(dim=(2, 3), dtype=torch.float64)
            while not outs:
                fut, buf = writes.popleft()
                fut.result()
                outs.append(buf)
            buf = outs.pop()
            buf[:y1 - y0, :x1 - x0].copy_(pred, non_blocking=cuda)
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
            writes.append((writer.submit(write, t, buf, in_buf, done), buf))
            if progress is not None:
                progress(1)
            faults.point(f"infer:{t}")
        for fut, _ in writes:
            fut.result()
    return images.cpu().numpy()
