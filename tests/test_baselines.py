"""Baselines give known results on constructed cases, streamed over chunks that do not divide the scan."""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr
from scipy import ndimage

from stemdist.quality import baselines


def _ramp(H=9, W=7, P=4, Q=3) -> np.ndarray:
    """Patterns that vary linearly over the scan: neighbour and Gaussian means keep them in the interior."""
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    base = np.arange(P * Q, dtype=np.float32).reshape(P, Q)
    return (base + 2 * yy[..., None, None] + 3 * xx[..., None, None]).astype(np.float32)


def test_neighbour_mean_of_a_ramp_is_the_ramp_inside():
    cube = _ramp()
    out = baselines.neighbour_mean(da.from_array(cube, chunks=(4, 3, 4, 3))).compute()
    np.testing.assert_allclose(out[1:-1, 1:-1], cube[1:-1, 1:-1], rtol=1e-6)
    # at a corner the mirrored neighbours (-1 -> 1) are used, never the centre itself
    p = np.pad(cube, ((1, 1), (1, 1), (0, 0), (0, 0)), mode="reflect")
    expect = sum(p[1 + dy, 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)) / 8
    np.testing.assert_allclose(out[0, 0], expect, rtol=1e-6)


def test_neighbour_mean_is_blind_to_the_centre():
    cube = np.zeros((5, 5, 2, 2), np.float32)
    cube[2, 2] = 8.0  # a lone pattern: its own position stays 0, each neighbour gets 8 / 8
    out = baselines.neighbour_mean(da.from_array(cube, chunks=(2, 2, 2, 2))).compute()
    assert out[2, 2].max() == 0
    expect = np.full((3, 3), 4.0)  # 2 x 2 pixels of 1 count around it
    expect[1, 1] = 0.0
    np.testing.assert_allclose(out[1:4, 1:4].sum(axis=(2, 3)), expect)


def test_gaussian_matches_scipy_over_chunks():
    rng = np.random.default_rng(0)
    cube = rng.random((11, 9, 3, 4)).astype(np.float32)
    for sigma in (0.7, 1.5):
        out = baselines.gaussian(da.from_array(cube, chunks=(4, 5, 3, 4)), sigma).compute()
        ref = ndimage.gaussian_filter(cube, (sigma, sigma, 0, 0), truncate=4.0, mode="reflect")
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    const = np.full((6, 6, 2, 2), 3.0, np.float32)
    np.testing.assert_allclose(baselines.gaussian(da.from_array(const, chunks=(3, 3, 2, 2))).compute(), 3.0)


def test_pca_recovers_a_low_rank_cube():
    rng = np.random.default_rng(1)
    mean = rng.random(16)
    comps = rng.standard_normal((2, 16))
    coef = rng.standard_normal((10, 8, 2))
    cube = (mean + coef @ comps).reshape(10, 8, 4, 4)
    d = da.from_array(cube, chunks=(3, 3, 4, 4))
    np.testing.assert_allclose(baselines.pca(d, rank=2).compute(), cube, atol=1e-4)
    np.testing.assert_allclose(baselines.pca(d, rank=2, exact=False).compute(), cube, atol=1e-4)
    # rank 1 keeps the leading direction only: the error is what the second component carries
    err = np.abs(baselines.pca(d, rank=1).compute() - cube).max()
    assert err > 1e-2


def test_write_streams_to_zarr(tmp_path):
    cube = _ramp(8, 8, 4, 4)
    src = zarr.create_array(store=str(tmp_path / "raw.zarr"), shape=cube.shape, chunks=(3, 3, 4, 4),
                            dtype="float32")
    src[:] = cube
    out = baselines.write(src, tmp_path / "baselines.zarr", 1.5, sigmas=(0.5, 2.0), rank=3)
    assert set(out) == {"gaussian_0.5", "gaussian_2", "gaussian_sure", "mean_pattern", "neighbours", "pca",
                        "pca_gaussian", "fused_mean", "fused_mean_wiener"}
    for arr in out.values():
        assert arr.shape == cube.shape and arr.chunks == (3, 3, 4, 4)
        assert arr.attrs["complete"] is True
    assert out["gaussian_sure"].attrs["sigma"] == 1.5 and out["gaussian_2"].attrs["sigma"] == 2.0
    np.testing.assert_allclose(out["neighbours"][1:-1, 1:-1], cube[1:-1, 1:-1], rtol=1e-6)
    np.testing.assert_allclose(out["mean_pattern"][:], np.broadcast_to(cube.mean((0, 1)), cube.shape), rtol=1e-5)
    assert "total" in out["fused_mean"].attrs["fuse_plan"]
    assert out["fused_mean_wiener"].attrs["fuse_plan"]["wiener"] and not out["fused_mean"].attrs["fuse_plan"]["wiener"]
    np.testing.assert_allclose(out["pca"][:], cube, rtol=1e-4, atol=1e-3)  # rank 2 + mean is exact
    # the ladder's composites are what they say: a Gaussian of the cube, and of the PCA cube
    np.testing.assert_allclose(out["gaussian_sure"][:], baselines.gaussian(cube, 1.5).compute(), rtol=1e-5)
    np.testing.assert_allclose(out["pca_gaussian"][:], baselines.gaussian(out["pca"][:], 1.5).compute(),
                               rtol=1e-4, atol=1e-3)


def test_at_low_dose_the_mean_pattern_beats_every_gaussian_and_its_fusion_beats_both(tmp_path):
    """Dose 20 on a 24 x 24 synthetic scan: the scan varies little against the noise, so the mean pattern
    (the Gaussian's infinite width) is the better estimate, and shrinking the raw counts towards it by
    SURE per detector region (``fused_mean``) is better still - the bar a network must clear."""
    from stemdist.io.synth import synth
    from stemdist.quality.metrics import psnr

    synth(tmp_path / "c.zarr", (24, 24), (16, 16), dose=20.0, seed=0, tile=8)
    raw = zarr.open_array(str(tmp_path / "c.zarr" / "noisy"), mode="r")
    truth = zarr.open_array(str(tmp_path / "c.zarr" / "truth"), mode="r")[:]
    out = baselines.write(raw, tmp_path / "b.zarr", 1.0, sigmas=(1.0, 2.0, 3.0), rank=4)
    score = {name: psnr(arr[:], truth) for name, arr in out.items()}
    best_gaussian = max(v for k, v in score.items() if k.startswith("gaussian"))
    assert score["mean_pattern"] > best_gaussian + 1
    assert score["fused_mean"] > score["mean_pattern"] + 0.5
