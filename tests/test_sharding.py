"""Sharding over ranks x loader workers: disjoint, complete, equal batch counts (no DDP hang)."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stemdist.data.dataset import NeighbourPatches, epoch_order, plan_shards
from stemdist.data.tiles import HOLDOUT_TILES, Grid, fold_of, fold_positions, holdout_positions, tile_of, tile_positions
from stemdist.io.zarr_store import create_cube
from stemdist.train.trainer import Batches


def positions_of(grid, shard_segments, borders):
    out = []
    for t, a, b in shard_segments:
        y0, _, x0, _ = grid.bounds(t)
        i, j = tile_positions(grid, t, borders)
        out += [(y0 + ii, x0 + jj) for ii, jj in zip(i[a:b], j[a:b], strict=True)]
    return out


@pytest.mark.parametrize("world,workers", list(itertools.product([1, 2, 3, 4], [0, 1, 2, 3])))
@pytest.mark.parametrize("scan,tile", [((13, 7), 4), ((5, 16), 3), ((9, 9), 9)])
@pytest.mark.parametrize("borders", ["reflect", "copy"])
def test_plan_is_disjoint_complete_and_even(world, workers, scan, tile, borders):
    grid = Grid(scan[0], scan[1], tile, tile)
    counts = grid.sample_counts(borders)
    B = 5
    n_shards = world * max(1, workers)
    for epoch in (0, 1):
        order = epoch_order(grid, 7, 2, epoch)
        assert sorted(order) == list(range(grid.n_tiles))  # a permutation of the tiles
        plan = plan_shards(counts, epoch_order(grid, 7, 2, epoch), n_shards, B)
        per_shard = [positions_of(grid, seg, borders) for seg in plan.segments]
        assert all(len(p) == plan.batches * B for p in per_shard)  # equal full batches everywhere
        seen = Counter(pos for p in per_shard for pos in p)
        expected = {(i, j) for i in range(scan[0]) for j in range(scan[1])
                    if borders == "reflect" or (0 < i < scan[0] - 1 and 0 < j < scan[1] - 1)}
        assert set(seen) == expected  # complete
        extra = sum(seen.values()) - len(expected)
        assert extra == plan.repeats < n_shards * B  # only the few repeats that even out the shards
        if plan.repeats == 0:
            assert max(seen.values()) == 1  # disjoint


def test_real_loaders_over_ranks_and_workers_cover_each_position_once(tmp_path):
    """Two simulated ranks, two loader worker processes each, through torch's DataLoader."""
    shape = (7, 10, 3, 3)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # centre pixel 0 identifies a position
    create_cube(tmp_path / "raw.zarr", None, shape, 3, "float32")[...] = data
    key = {float(data[i, j, 0, 0]): (i, j) for i in range(7) for j in range(10)}
    batches, seen = [], Counter()
    for rank in range(2):
        ds = NeighbourPatches(str(tmp_path / "raw.zarr"), batch_size=4, num_workers=2, rank=rank, world_size=2)
        ds.set_epoch(3)
        n = 0
        for _, y in Batches(DataLoader(ds, batch_size=None, num_workers=2), len(ds)):
            n += 1
            seen.update(key[float(v)] for v in y[:, 0, 0, 0])
        batches.append(n)
        assert n == len(ds)
    assert batches[0] == batches[1]
    assert set(seen) == set(key.values())
    assert sum(seen.values()) - 70 == ds.plan(3).repeats
    assert torch.is_tensor(y)


@pytest.mark.parametrize("borders", ["reflect", "copy"])
def test_held_out_positions_are_never_targets_and_are_the_validation_set(tmp_path, borders):
    """Over two ranks with loader workers: training targets skip the held-out positions, in every epoch; the
    held-out set's targets are exactly them (raw counts, even when training targets are a blend), and they
    still appear as neighbours."""
    shape = (13, 11, 3, 3)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # pixel (0, 0) identifies a position
    create_cube(tmp_path / "raw.zarr", None, shape, 4, "float32")[...] = data
    create_cube(tmp_path / "den.zarr", None, shape, 4, "float32")[...] = -data
    raw, den = str(tmp_path / "raw.zarr"), str(tmp_path / "den.zarr")
    key = {float(data[i, j, 0, 0]): (i, j) for i in range(13) for j in range(11)}
    grid = Grid(13, 11, 4, 4)
    held = holdout_positions(grid, borders, 0.1, seed=3)
    positions = {(int(y), int(x)) for y, x in zip(*np.divmod(held, 11), strict=True)}
    samples = {(i, j) for i in range(13) for j in range(11)
               if borders == "reflect" or (0 < i < 12 and 0 < j < 10)}
    assert len(held) == round(0.1 * len(samples)) and positions <= samples
    assert np.array_equal(held, holdout_positions(grid, borders, 0.1, seed=3))
    assert not np.array_equal(held, holdout_positions(grid, borders, 0.1, seed=4))
    train, neighbours = Counter(), set()
    for rank in range(2):
        ds = NeighbourPatches(raw, batch_size=4, num_workers=2, rank=rank, world_size=2, borders=borders,
                              holdout=held)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            for x, y in Batches(DataLoader(ds, batch_size=None, num_workers=2), len(ds)):
                train.update(key[float(v)] for v in y[:, 0, 0, 0])
                neighbours.update(key[float(v)] for v in x[:, :, 0, 0].flatten())
    assert set(train) == samples - positions and positions <= neighbours
    val = Counter()
    for rank in range(2):
        ds = NeighbourPatches(raw, den, 0.5, batch_size=4, rank=rank, world_size=2, borders=borders,
                              holdout=held, heldout=True, target="raw")
        for _, y in ds.batches():
            val.update(key[float(v)] for v in y[:, 0, 0, 0])
    assert set(val) == positions and sum(val.values()) - len(positions) == ds.plan(0).repeats


def test_holdout_is_bounded_on_a_large_scan():
    """A 1024 x 1024 scan: at most 4,096 held-out positions, in at most HOLDOUT_TILES tiles."""
    grid = Grid(1024, 1024, 16, 16)
    held = holdout_positions(grid, "reflect", 0.05, seed=0)
    assert len(held) == 4096 and len(np.unique(held)) == 4096
    assert len(np.unique(tile_of(grid, held))) <= HOLDOUT_TILES
    assert len(holdout_positions(grid, "reflect", 0.0, seed=0)) == 0


def _identity_cube(path, shape=(12, 12, 3, 3)):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    create_cube(path, None, shape, 2, "float32")[...] = data
    return path


@pytest.mark.parametrize("target", ["mix", "raw"])
def test_reused_worker_buffers_give_the_in_process_batches(tmp_path, target):
    """A worker refills its shared buffers once Batches has released them: the batches are those made in
    process (same shard, same order), over several epochs, with and without raw targets."""
    raw = str(_identity_cube(tmp_path / "raw.zarr"))
    den = str(_identity_cube(tmp_path / "den.zarr"))
    kw = dict(batch_size=5, shuffle_tiles=2, num_workers=1, prefetch_factor=1, target=target)
    worker_ds = NeighbourPatches(raw, den, 0.25, **kw)
    loader = Batches(DataLoader(worker_ds, batch_size=None, num_workers=1, persistent_workers=True,
                                prefetch_factor=1), len(worker_ds))
    for epoch in range(3):
        worker_ds.set_epoch(epoch)
        local = NeighbourPatches(raw, den, 0.25, **kw)
        local.set_epoch(epoch)
        expected = list(local.batches())
        got = [(x.clone(), y.clone()) for x, y in loader]
        assert len(got) == len(expected) == len(worker_ds) > worker_ds._held.shape[1]  # the ring went round
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_consumer_that_keeps_every_group_sees_none_overwritten(tmp_path):
    """Groups never released (a plain DataLoader loop keeping them all) are never reused: the worker takes
    fresh buffers once its ring is held."""
    raw = str(_identity_cube(tmp_path / "raw.zarr"))
    kw = dict(batch_size=4, shuffle_tiles=1, num_workers=1, prefetch_factor=1)
    ds = NeighbourPatches(raw, **kw)
    kept = list(DataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=1))
    local = NeighbourPatches(raw, **kw)
    expected = list(local)
    assert len(kept) == len(expected) > ds._held.shape[1]
    for g, e in zip(kept, expected, strict=True):
        assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1])
    assert int(kept[-1][3][1]) == -1  # the last ones came from fresh buffers


@pytest.mark.parametrize("borders", ["reflect", "copy"])
def test_crossfit_folds_split_the_sample_positions(borders):
    """train.crossfit: the K folds partition the sample positions (none twice, none left out, the border frame
    of copy borders in none), each about a Kth, and the seed redraws them; fold_of answers without a scan map."""
    grid = Grid(37, 29, 8, 8)
    samples = {(i, j) for i in range(37) for j in range(29) if borders == "reflect" or (0 < i < 36 and 0 < j < 28)}
    folds = [fold_positions(grid, borders, k, 3, seed=5) for k in range(3)]
    flat = np.concatenate(folds)
    assert len(flat) == len(np.unique(flat)) == len(samples)
    assert {(int(y), int(x)) for y, x in zip(*np.divmod(flat, 29), strict=True)} == samples
    assert all(abs(len(f) - len(samples) / 3) < 0.1 * len(samples) for f in folds)
    for k, f in enumerate(folds):
        assert (fold_of(f, 3, 5) == k).all()
    assert not np.array_equal(folds[0], fold_positions(grid, borders, 0, 3, seed=6))
