"""Distributed inference: each rank predicts and writes its own whole chunks of the output cube.

Reading (tiles with halo, blended on the fly), prediction and writing overlap: one thread reads
ahead, the main thread runs the network, one thread compresses and writes finished chunks. No locks
are needed because no two ranks (or threads) ever write the same chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import zarr

from .. import faults
from ..data.tiles import BlockReader, Borders, Grid, flat_index, tile_positions
from . import hardware

READ_AHEAD = 2
WRITES_IN_FLIGHT = 2


def owned_tiles(n_tiles: int, rank: int, world_size: int) -> range:
    """A contiguous run of tiles (whole chunks) per rank: disjoint, covering, and cache-friendly."""
    return range(rank * n_tiles // world_size, (rank + 1) * n_tiles // world_size)


@torch.inference_mode()
def predict_block(model: torch.nn.Module, block: np.ndarray, grid: Grid, t: int, borders: Borders,
                  batch_size: int, device: torch.device, autocast: torch.dtype | None = None) -> np.ndarray:
    """Denoised patterns of tile ``t`` from its halo ``block``; with ``copy`` borders those are copied."""
    y0, y1, x0, x1 = grid.bounds(t)
    out = block[1:y1 - y0 + 1, 1:x1 - x0 + 1].copy()
    ii, jj = tile_positions(grid, t, borders)
    # the block's patterns cross to the device once; the 8-neighbour stacks are built there
    patterns = torch.from_numpy(np.ascontiguousarray(block).reshape(-1, *block.shape[2:]))
    if device.type == "cuda":
        patterns = patterns.pin_memory()
    patterns = patterns.to(device, non_blocking=True)
    index = torch.from_numpy(flat_index(np.zeros_like(ii), ii, jj, block.shape[:2])[:, :8]).to(device)
    for s in range(0, len(ii), batch_size):
        with hardware.autocast(device, autocast):
            pred = model(patterns[index[s:s + batch_size]])
        out[ii[s:s + batch_size], jj[s:s + batch_size]] = pred[:, 0].float().cpu().numpy()
    return out


def _read_ahead(reader: BlockReader, tiles: range) -> Iterator[tuple[int, np.ndarray]]:
    with ThreadPoolExecutor(1, thread_name_prefix="stemdist-read") as pool:
        pending: deque[tuple[int, Future]] = deque()
        for t in tiles:
            pending.append((t, pool.submit(reader.block, t)))
            if len(pending) > READ_AHEAD:
                t0, fut = pending.popleft()
                yield t0, fut.result()
        while pending:
            t0, fut = pending.popleft()
            yield t0, fut.result()


def infer(model: torch.nn.Module, raw: zarr.Array, den: zarr.Array | None, beta: float, out: zarr.Array,
          *, borders: Borders, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
          cache_chunks: int = 24, autocast: torch.dtype | None = None, progress=None,
          bf_mask: np.ndarray | None = None) -> np.ndarray:
    """Write this rank's chunks of ``out`` = model applied to ``(1 - beta) raw + beta den``.

    Returns two images of the chunks this rank wrote, zero elsewhere (summed over ranks they are whole, for
    free: no second pass): ``[0]`` the virtual bright-field (counts in ``bf_mask``, or the whole detector),
    ``[1]`` the total counts of every pattern (what the divergence check reads).
    """
    grid = Grid.of(out)  # the output's chunks: each rank writes whole ones
    reader = BlockReader(raw, den, beta, cache_chunks, grid)
    tiles = owned_tiles(grid.n_tiles, rank, world_size)
    model.eval()
    images = np.zeros((2, grid.H, grid.W))
    with ThreadPoolExecutor(1, thread_name_prefix="stemdist-write") as writer:
        writes: deque[Future] = deque()
        for t, block in _read_ahead(reader, tiles):
            pred = predict_block(model, block, grid, t, borders, batch_size, device, autocast)
            y0, y1, x0, x1 = grid.bounds(t)
            images[1, y0:y1, x0:x1] = pred.sum(axis=(2, 3), dtype=np.float64)
            images[0, y0:y1, x0:x1] = (images[1, y0:y1, x0:x1] if bf_mask is None
                                       else np.tensordot(pred, bf_mask, axes=([2, 3], [0, 1])))
            writes.append(writer.submit(out.__setitem__, (slice(y0, y1), slice(x0, x1)), pred))
            while len(writes) > WRITES_IN_FLIGHT:
                writes.popleft().result()
            if progress is not None:
                progress(1)
            faults.point(f"infer:{t}")
        for w in writes:
            w.result()
    return images
