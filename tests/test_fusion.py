"""The final estimate's fusion with the raw counts: SURE's choice of width and the out-of-core fuse."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage

from stemdist.io.zarr_store import create_cube
from stemdist.quality import sure
from stemdist.run import fusion


def smooth_image(n: int = 40, level: float = 80.0, contrast: float = 10.0) -> np.ndarray:
    y, x = np.mgrid[:n, :n]
    return level + contrast * np.sin(2 * np.pi * y / n) * np.cos(2 * np.pi * x / n)


def test_sure_risk_is_unbiased_for_the_true_risk():
    rng = np.random.default_rng(0)
    lam = smooth_image(24)
    for sigma in (0.0, 1.0, 2.5):
        risks, true = [], []
        for _ in range(300):
            y = rng.poisson(lam).astype(np.float64)
            s = ndimage.gaussian_filter(y, sigma, truncate=sure.TRUNCATE, mode="reflect") if sigma else y
            risks.append(sure.sure_risk(y, sigma))
            true.append(((s - lam) ** 2).sum())
        # SURE's own spread is large; the mean of 300 draws is within a few standard errors
        assert abs(np.mean(risks) - np.mean(true)) < 4 * np.std(risks) / np.sqrt(300) + 1e-9, sigma


def test_sure_sigma_smooths_smooth_noisy_images_and_spares_sharp_clean_ones():
    rng = np.random.default_rng(1)
    assert sure.sure_sigma(rng.poisson(smooth_image()).astype(float)) >= 1.0
    sharp = np.where((np.add.outer(np.arange(40), np.arange(40)) % 2) == 0, 1e5, 2e5)  # checkerboard
    assert sure.sure_sigma(rng.poisson(sharp).astype(float)) == 0.0


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((2, 9)), np.full((4, 4), np.nan), -np.ones((4, 4))])
def test_sure_sigma_refuses_bad_images(bad):
    with pytest.raises(ValueError, match="sure_sigma"):
        sure.sure_sigma(bad)


@pytest.mark.parametrize("shape,tile,sigma", [((24, 20, 5, 6), 7, 2.0), ((9, 13, 4, 4), 3, 1.25),
                                              ((5, 6, 3, 3), 2, 4.0)])
def test_fuse_chunk_by_chunk_equals_fusing_the_whole_cube(tmp_path, shape, tile, sigma):
    rng = np.random.default_rng(2)
    truth = rng.uniform(1, 5, shape)
    raw_np = rng.poisson(truth).astype(np.uint16)
    den_np = (0.8 * truth).astype(np.float32)
    raw = create_cube(tmp_path / "raw.zarr", None, shape, tile, "uint16")
    raw[...] = raw_np
    den = create_cube(tmp_path / "den.zarr", None, shape, tile, "float32")
    den[...] = den_np
    whole = fusion.fuse_block(raw_np, den_np, sigma)
    for name, source in (("zarr", den), ("dask", da.from_zarr(den) * 1.0)):  # a cycle, or a mean of cycles
        out = create_cube(tmp_path / f"out_{name}.zarr", None, shape, tile, "float32")
        fusion.fuse_into(out, raw, source, sigma, threads=2)
        np.testing.assert_allclose(out[...], whole, rtol=1e-5, atol=1e-5)
    assert np.array_equal(zarr.open_array(str(tmp_path / "raw.zarr"), mode="r")[...], raw_np)  # untouched


def test_fuse_removes_a_network_bias_and_keeps_detail():
    rng = np.random.default_rng(3)
    H = W = 32
    yy, xx = np.mgrid[:H, :W]
    ky, kx = np.mgrid[:8, :8]
    # patterns whose disk shifts smoothly over the scan; the "network" is right in shape but 10% dark
    shift = 1.5 * np.sin(2 * np.pi * yy / H)[..., None, None]
    truth = 2.0 * np.exp(-((ky - 3.5 - shift) ** 2 + (kx - 3.5) ** 2) / 6.0) + 0.05
    raw = rng.poisson(truth).astype(np.float32)
    den = (0.9 * truth).astype(np.float32)
    fused = fusion.fuse_block(raw, den, 2.0)
    err = lambda e: np.sqrt(((e - truth) ** 2).mean())  # noqa: E731
    assert err(fused) < 0.6 * err(den) and err(fused) < 0.2 * err(raw)
    np.testing.assert_allclose(fused.mean(axis=(0, 1)), truth.mean(axis=(0, 1)), rtol=0.1, atol=0.01)
    assert (fused >= 0).all()
    np.testing.assert_array_equal(fusion.fuse_block(raw, den, 0.0), den)  # sigma 0: the network's cube


def test_fuse_refuses_mismatched_cubes(tmp_path):
    out = create_cube(tmp_path / "out.zarr", None, (4, 4, 2, 2), 2, "float32")
    with pytest.raises(ValueError, match="differ in shape"):
        fusion.fuse_into(out, np.zeros((4, 4, 2, 2)), np.zeros((4, 5, 2, 2)), 1.0)


def test_fuse_block_leaves_its_inputs_alone():
    rng = np.random.default_rng(4)
    raw = rng.poisson(2.0, (6, 6, 3, 3)).astype(np.float32)
    den = np.full((6, 6, 3, 3), 2.0, np.float32)
    raw0, den0 = raw.copy(), den.copy()
    fusion.fuse_block(raw, den, 1.5)
    np.testing.assert_array_equal(raw, raw0)
    np.testing.assert_array_equal(den, den0)


@pytest.mark.parametrize("n,sigma", [(3, 4.0), (7, 1.25), (40, 2.0), (5, 0.25)])
def test_self_weights_are_the_smoothing_matrix_diagonal(n, sigma):
    matrix = ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, truncate=sure.TRUNCATE, mode="reflect")
    np.testing.assert_allclose(sure._self_weights(n, sigma), np.diagonal(matrix), atol=1e-12)
