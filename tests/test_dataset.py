"""The neighbour-patch dataset against a naive numpy gather, on real Zarr stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from stemdist.data.dataset import NeighbourPatches
from stemdist.data.tiles import BlockReader, Grid, flat_index, neighbour_offsets, tile_positions
from stemdist.io.zarr_store import create_cube


def make_cubes(tmp_path, shape, tile, seed=0):
    """Two float cubes with unique random patterns: ``raw`` and ``den``."""
    rng = np.random.default_rng(seed)
    cubes = {}
    for name in ("raw", "den"):
        data = rng.random(shape, dtype=np.float32) * 5
        arr = create_cube(tmp_path / f"{name}.zarr", None, shape, tile, "float32")
        arr[...] = data
        cubes[name] = (str(tmp_path / f"{name}.zarr"), data)
    return cubes


def naive_samples(mix, borders, halo=1):
    """{(i, j): (neighbours (m, P, Q), centre (P, Q))} by plain indexing, as the reference does (its 3 x 3
    window for ``halo`` 1; 5 x 5 for 2, in raster order)."""
    H, W = mix.shape[:2]
    r = halo
    padded = np.pad(mix, ((r, r), (r, r), (0, 0), (0, 0)), mode="reflect")
    out = {}
    for i in range(H):
        for j in range(W):
            if borders == "copy" and not (r <= i <= H - 1 - r and r <= j <= W - 1 - r):
                continue
            offsets = [(di, dj) for di in range(-r, r + 1) for dj in range(-r, r + 1) if (di, dj) != (0, 0)]
            nb = np.stack([padded[i + r + di, j + r + dj] for di, dj in offsets])
            out[(i, j)] = (nb, mix[i, j])
    return out


@pytest.mark.parametrize("shape,tile", [((10, 9, 12, 10), 4), ((5, 7, 3, 5), 2), ((3, 3, 4, 4), 3),
                                        ((6, 11, 16, 16), 5)])
@pytest.mark.parametrize("borders", ["reflect", "copy"])
@pytest.mark.parametrize("halo", [1, 2])
def test_block_gather_equals_naive(tmp_path, shape, tile, borders, halo):
    cubes = make_cubes(tmp_path, shape, tile)
    raw = zarr.open_array(cubes["raw"][0], mode="r")
    den = zarr.open_array(cubes["den"][0], mode="r")
    beta = 0.3
    mix = (1 - beta) * cubes["raw"][1] + beta * cubes["den"][1]
    naive = naive_samples(mix, borders, halo)
    grid = Grid.of(raw, halo)
    reader = BlockReader(raw, den, beta, cache_chunks=2, grid=grid)
    seen = set()
    for t in range(grid.n_tiles):
        y0, _, x0, _ = grid.bounds(t)
        block = reader.block(t)
        i, j = tile_positions(grid, t, borders)
        assert block.shape[:2] == (grid.bounds(t)[1] - y0 + 2 * halo, grid.bounds(t)[3] - x0 + 2 * halo)
        window = block.reshape(-1, *block.shape[2:])[flat_index(np.zeros_like(i), i, j, block.shape[:2], halo)]
        nb, ce = window[:, :-1], window[:, -1:]
        assert nb.shape[1] == (2 * halo + 1) ** 2 - 1
        for n in range(len(i)):
            key = (y0 + i[n], x0 + j[n])
            seen.add(key)
            np.testing.assert_allclose(nb[n], naive[key][0], rtol=1e-6)
            np.testing.assert_allclose(ce[n, 0], naive[key][1], rtol=1e-6)
    assert seen == set(naive)


@pytest.mark.parametrize("borders", ["reflect", "copy"])
@pytest.mark.parametrize("target", ["mix", "raw"])
@pytest.mark.parametrize("halo", [1, 2])
def test_dataset_batches_are_the_naive_samples(tmp_path, borders, target, halo):
    shape = (9, 7, 6, 5)
    cubes = make_cubes(tmp_path, shape, tile=3)
    beta = 0.6
    raw_np, den_np = cubes["raw"][1], cubes["den"][1]
    mix = (1 - beta) * raw_np + beta * den_np
    naive = naive_samples(mix, borders, halo)
    # the four nearest neighbours identify the position (their first pixels are unique per pattern)
    near = [int(np.flatnonzero((neighbour_offsets(halo) == d).all(1))[0]) for d in [(-1, 0), (1, 0), (0, -1), (0, 1)]]

    def key(nb):
        return tuple(round(float(nb[c, 0, 0]), 5) for c in near)

    where = {key(nb): (i, j) for (i, j), (nb, _) in naive.items()}
    ds = NeighbourPatches(cubes["raw"][0], cubes["den"][0], beta, batch_size=4, borders=borders, target=target,
                          shuffle_tiles=2, cache_chunks=3, halo=halo)
    plan = ds.plan(0)
    counts: dict = {}
    n_batches = 0
    for x, y in ds.batches():
        n_batches += 1
        assert x.shape == (4, (2 * halo + 1) ** 2 - 1, 6, 5) and y.shape == (4, 1, 6, 5) and x.dtype == torch.float32
        for nb, ce in zip(x.numpy(), y.numpy(), strict=True):
            pos = where[key(nb)]
            np.testing.assert_allclose(nb, naive[pos][0], rtol=1e-6)
            expected = naive[pos][1] if target == "mix" else raw_np[pos]
            np.testing.assert_allclose(ce[0], expected, rtol=1e-6)
            counts[pos] = counts.get(pos, 0) + 1
    assert n_batches == plan.batches == len(ds)
    assert set(counts) == set(naive)  # every position is a sample
    assert sum(counts.values()) - len(naive) == plan.repeats < 4


def test_epochs_differ_and_are_reproducible(tmp_path):
    cubes = make_cubes(tmp_path, (8, 8, 4, 4), tile=2)

    def first_batch(epoch, seed=0):
        ds = NeighbourPatches(cubes["raw"][0], batch_size=8, seed=seed, cycle=1)
        ds.set_epoch(epoch)
        return next(ds.batches())[1]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert not torch.equal(first_batch(0), first_batch(0, seed=1))


def test_batches_close_stops_the_persistent_workers_mid_epoch(small_cube):
    """Lightning leaves the loader mid-epoch (it stops at ``len`` batches); close() stops its workers there."""
    import multiprocessing

    from stemdist import config as cfg
    from stemdist.train.trainer import loader

    conf = cfg.load("smoke", {"data": {"num_workers": 2}})
    ds = NeighbourPatches(str(small_cube / "noisy"), None, 0.0, batch_size=4, num_workers=2, shuffle_tiles=2)
    batches = loader(ds, conf)
    it = iter(batches)
    next(it)
    assert len(multiprocessing.active_children()) == 2
    batches.close()
    assert multiprocessing.active_children() == []
    plan = ds.plan(0)
    assert sum(len(x) for x, _ in batches) == plan.total + plan.repeats  # a new epoch starts cleanly
    batches.close()
