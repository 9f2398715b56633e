"""Metrics against hand-computed values on small arrays; masks on patterns of known disk radius."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from stemdist.io.synth import expected_patterns
from stemdist.quality import metrics


def test_psnr_by_hand():
    truth = np.zeros((2, 2, 2, 2))
    truth[0, 0, 0, 0] = 4.0  # data range L = 4
    est = truth + 1.0  # every pixel off by 1: MSE = 1
    assert metrics.psnr(est, truth) == pytest.approx(10 * np.log10(16.0))


def test_relative_rmse_by_hand():
    truth = np.full((3, 3, 2, 2), 2.0)
    est = truth.copy()
    est[0, 0, 0, 0] = 5.0  # one error of 3 in ||truth|| = sqrt(36 * 4)
    assert metrics.relative_rmse(est, truth) == pytest.approx(3 / 12)


def test_ssim_identical_and_constant_patterns():
    rng = np.random.default_rng(0)
    t = rng.random((3, 16, 16))
    np.testing.assert_allclose(metrics.ssim_patterns(t, t, 1.0), 1.0)
    # constant patterns a, b: no variance, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, L = 0.5, 0.25, 1.0
    c1 = (0.01 * L) ** 2
    s = metrics.ssim_patterns(np.full((1, 16, 16), a), np.full((1, 16, 16), b), L)
    assert s[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_relative_image_error_by_hand():
    truth = np.array([[1.0, 3.0]])  # mean 2, ||truth - mean|| = sqrt(2)
    est = np.array([[2.0, 3.0]])  # ||est - truth|| = 1
    assert metrics.relative_image_error(est, truth) == pytest.approx(1 / np.sqrt(2))


def test_virtual_images_by_hand():
    cube = np.zeros((1, 2, 5, 5))
    cube[0, 0, 2, 2] = 3.0  # all counts at the centre
    cube[0, 1, 2, 4] = 1.0  # one count 2 px right of the centre, outside the disk, inside the ring
    masks = metrics.Masks(center=(2.0, 2.0), bf_radius=1.0, adf_inner=1.5, adf_outer=3.0)
    v = metrics.virtual_images(da.from_array(cube, chunks=(1, 1, 5, 5)), masks)
    np.testing.assert_allclose(v["bf"], [[3.0, 0.0]])
    np.testing.assert_allclose(v["adf"], [[0.0, 1.0]])
    np.testing.assert_allclose(v["com_x"], [[0.0, 2.0]])
    np.testing.assert_allclose(v["com_y"], [[0.0, 0.0]])


def test_evaluate_cubes_matches_in_memory():
    rng = np.random.default_rng(1)
    yy, xx = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
    truth = expected_patterns(yy.ravel(), xx.ravel(), 20, 20, 50.0).reshape(6, 5, 20, 20)
    est = rng.poisson(truth).astype(np.float32)
    masks = metrics.find_masks(truth.mean(axis=(0, 1)))
    m, virt, tv, L = metrics.evaluate_cubes({"est": da.from_array(est, chunks=(4, 2, 20, 20))},
                                            da.from_array(truth, chunks=(3, 3, 20, 20)), masks)
    r = m["est"]
    assert L == pytest.approx(truth.max())
    assert r["psnr"] == pytest.approx(metrics.psnr(est, truth), rel=1e-6)
    inner = 10 * np.log10(L**2 / np.mean((est - truth)[1:-1, 1:-1].astype(np.float64) ** 2))
    assert r["psnr_interior"] == pytest.approx(inner, rel=1e-6)
    assert r["rel_rmse"] == pytest.approx(metrics.relative_rmse(est, truth), rel=1e-6)
    assert r["ssim"] == pytest.approx(metrics.ssim_patterns(est, truth, L).mean(), rel=1e-6)
    bf = (est * masks.bf((20, 20))).sum(axis=(2, 3))
    bf_t = (truth * masks.bf((20, 20))).sum(axis=(2, 3))
    assert r["bf_err"] == pytest.approx(metrics.relative_image_error(bf, bf_t), rel=1e-5)
    assert virt["est"].shape == (6, 5, 4) and tv.shape == (6, 5, 4)


@pytest.mark.parametrize("P", [40, 64])
def test_masks_find_a_known_disk(P):
    # synth draws the bright-field disk with radius P / 5, centred on the detector
    yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    cube = expected_patterns(yy.ravel(), xx.ravel(), P, P, 100.0)
    masks = metrics.find_masks(cube.mean(axis=0))
    assert masks.bf_radius == pytest.approx(P / 5, abs=0.5)
    assert masks.center == pytest.approx(((P - 1) / 2, (P - 1) / 2), abs=0.3)
    assert masks.adf_inner == pytest.approx(1.2 * masks.bf_radius)
    assert masks.adf_outer == pytest.approx(3.0 * masks.bf_radius)


def test_masks_options_override_and_check():
    flat = np.ones((10, 10))
    m = metrics.find_masks(flat, center=(4.0, 5.0), bf_radius=2.0, adf_inner=3.0, adf_outer=4.5)
    assert m == metrics.Masks((4.0, 5.0), 2.0, 3.0, 4.5)
    assert m.bf((10, 10)).sum() == 13  # lattice points within radius 2
    with pytest.raises(ValueError):
        metrics.find_masks(flat, bf_radius=2.0, adf_inner=4.0, adf_outer=3.0)


def test_mean_pattern_from_sampled_chunks():
    rng = np.random.default_rng(2)
    cube = rng.random((12, 12, 4, 4))
    d = da.from_array(cube, chunks=(3, 3, 4, 4))
    np.testing.assert_allclose(metrics.mean_pattern(d), cube.mean(axis=(0, 1)))
    sampled = metrics.mean_pattern(d, max_chunks=2)  # chunks 0 and 15: the two corners
    expected = np.concatenate([cube[:3, :3], cube[9:, 9:]]).mean(axis=(0, 1))
    np.testing.assert_allclose(sampled, expected)


def test_ssim_patterns_matches_scikit_image():
    """Per-pattern SSIM equals scikit-image's Gaussian-window SSIM (sigma 1.5, population covariance) with
    the same 5 px border left out."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    truth = rng.gamma(2.0, 5.0, size=(3, 24, 20))
    est = rng.poisson(truth).astype(float)
    L = float(truth.max())
    ours = metrics.ssim_patterns(est, truth, L)
    for k in range(3):
        _, full = structural_similarity(est[k], truth[k], data_range=L, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, full=True)
        p = metrics.SSIM_PAD
        assert ours[k] == pytest.approx(full[p:-p, p:-p].mean(), rel=1e-9)


def test_bias_figures_say_half_the_counts_and_a_flattened_contrast():
    """bf/adf_mean and _contrast: 1 for the truth, 0.5 for half the truth, contrast ~0 for a flat estimate."""
    yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    truth = expected_patterns(yy.ravel(), xx.ravel(), 20, 20, 50.0).reshape(8, 8, 20, 20)
    masks = metrics.find_masks(truth.mean(axis=(0, 1)))
    flat = np.broadcast_to(truth.mean(axis=(0, 1)), truth.shape).copy()
    m, *_ = metrics.evaluate_cubes({"truth": truth, "half": truth * 0.5, "flat": flat}, truth, masks)
    for k in ("bf", "adf"):
        assert m["truth"][f"{k}_mean"] == pytest.approx(1.0) and m["truth"][f"{k}_contrast"] == pytest.approx(1.0)
        assert m["half"][f"{k}_mean"] == pytest.approx(0.5) and m["half"][f"{k}_contrast"] == pytest.approx(0.5)
        assert m["flat"][f"{k}_mean"] == pytest.approx(1.0) and m["flat"][f"{k}_contrast"] < 1e-6


def test_blind_spot_reference_by_hand():
    tv = np.zeros((3, 3, 4))
    tv[1, 1, 0] = 8.0  # BF: one bright position, which its neighbours see and itself never
    tv[..., 1] = np.arange(3.0)[None, :]  # ADF: a ramp along x
    ref = metrics.blind_spot_reference(tv, halo=1)
    # mirrored edges (numpy's reflect, never the centre): an edge position sees the centre 2 times of 8 (2),
    # a corner 4 times (4), the centre none
    nb_bf = np.array([[4.0, 2.0, 4.0], [2.0, 0.0, 2.0], [4.0, 2.0, 4.0]])
    t = tv[..., 0]
    assert ref["bf_contrast"] == pytest.approx(nb_bf.std() / t.std())
    assert ref["bf_err"] == pytest.approx(np.linalg.norm(nb_bf - t) / np.linalg.norm(t - t.mean()))
    # column 0: 3 x column 1 (1) + 2 x itself (0) + 3 x column 1 mirrored (1) -> 6 / 8; column 2 -> 10 / 8
    nb_adf = np.tile([0.75, 1.0, 1.25], (3, 1))
    ramp = tv[..., 1]
    assert ref["adf_contrast"] == pytest.approx(0.25)
    assert ref["adf_err"] == pytest.approx(np.linalg.norm(nb_adf - ramp) / np.linalg.norm(ramp - ramp.mean()))
    wide = metrics.blind_spot_reference(np.repeat(np.repeat(tv, 3, 0), 3, 1), halo=2)
    assert 0 < wide["bf_contrast"] < 1 and np.isfinite(wide["adf_err"])
