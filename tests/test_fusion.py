"""The final estimate's fusion with the raw counts: SURE's choice of width and the out-of-core fuse."""

from __future__ import annotations

from dataclasses import replace

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
    np.testing.assert_allclose(sure.self_weights(n, sigma), np.diagonal(matrix), atol=1e-12)


# --- the regions fusion ----------------------------------------------------------------------------

def disk_cube(rng, H=24, W=24, P=16, dose=40.0, shift_amp=1.5):
    """Patterns of a bright disk whose centre shifts smoothly over the scan and a dark-field halo whose level
    varies: counts, truth, the halo's part of the truth and the detector's regions."""
    yy, xx = np.mgrid[:H, :W]
    ky, kx = np.mgrid[:P, :P]
    cy = 7.5 + shift_amp * np.sin(2 * np.pi * yy / H)[..., None, None]
    cx = 7.5 + shift_amp * np.cos(2 * np.pi * xx / W)[..., None, None]
    r2 = (ky - cy) ** 2 + (kx - cx) ** 2
    disk = 1.0 / (1 + np.exp((np.sqrt(r2) - 4.0) * 3))
    halo = 0.05 * (1 + 0.8 * np.sin(2 * np.pi * (yy + xx) / 8))[..., None, None] * np.exp(-r2 / 40)
    norm = dose / (disk + halo).sum(axis=(2, 3), keepdims=True)
    labels = fusion.detector_regions((P, P), (7.5, 7.5), 4.0, sectors=4)
    return rng.poisson((disk + halo) * norm).astype(np.float32), (disk + halo) * norm, halo * norm, labels


def network_like(raw: np.ndarray, halo: np.ndarray) -> np.ndarray:
    """What a blind-spot network gives: its 8 neighbours' mean, smooth over the detector, with the
    dark-field halo's contrast lost (its level the scan's average)."""
    n8 = np.ones((3, 3, 1, 1)) / 8
    n8[1, 1] = 0
    den = ndimage.gaussian_filter(ndimage.convolve(raw.astype(np.float64), n8, mode="reflect"), (0, 0, 1, 1))
    return np.maximum(den - halo + halo.mean(axis=(0, 1)), 0).astype(np.float32)


def write(tmp_path, name, arr, tile):
    z = create_cube(tmp_path / f"{name}.zarr", None, arr.shape, tile, str(arr.dtype))
    z[...] = arr
    return z


def test_regions_fusion_chunk_by_chunk_equals_the_whole_cube_and_keeps_region_totals(tmp_path):
    rng = np.random.default_rng(5)
    raw_np, truth, halo, labels = disk_cube(rng)
    den_np = (truth * rng.uniform(0.7, 1.3, truth.shape)).astype(np.float32)  # a noisy, biased "network"
    raw, den = write(tmp_path, "raw", raw_np, 7), write(tmp_path, "den", den_np, 7)
    plan = fusion.choose_regions(raw, den, labels, truth.mean(axis=(0, 1)), sectors=4, share_sigma=1.0)
    whole = plan.apply(raw_np, den_np)
    out = create_cube(tmp_path / "out.zarr", None, raw_np.shape, 7, "float32")
    fusion.fuse_into(out, raw, den, plan, threads=2)
    np.testing.assert_allclose(out[...], whole, rtol=1e-5, atol=1e-5)
    assert (whole >= 0).all()
    # every region of every pattern holds the fused total that SURE chose for it
    totals = np.maximum(plan.fused_totals(den_np, 0, 0), 0)
    np.testing.assert_allclose(plan.totals(whole), totals, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(raw[...], raw_np)  # the inputs are left as they were
    np.testing.assert_array_equal(den[...], den_np)
    # with smoothed shares and the counts' detail each chunk computes its centre only, from the same halo
    detailed = replace(plan, share_sigma=1.5, detail_sigma=1.0, detector_sigma=1.0, detail_gain=0.5)
    out = create_cube(tmp_path / "detailed.zarr", None, raw_np.shape, 7, "float32")
    fusion.fuse_into(out, raw, den, detailed, threads=2)
    np.testing.assert_allclose(out[...], detailed.apply(raw_np, den_np), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[...], whole, atol=1e-2)  # the detail and the smoothing did change it


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.25, 4.0])
def test_scan_smooth_at_equals_smoothing_everything_and_keeping_a_part(sigma):
    a = np.random.default_rng(0).random((11, 9, 3, 2), dtype=np.float32)
    for rows, cols in [(slice(0, 11), slice(0, 9)), (slice(3, 8), slice(2, 5)), (slice(0, 2), slice(7, 9))]:
        np.testing.assert_allclose(sure.scan_smooth_at(a, sigma, rows, cols), sure.scan_smooth(a, sigma)[rows, cols],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("detector_sigma", [0.0, 1.0, 2.0])
def test_detail_own_is_the_diagonal_of_the_detail_map(detector_sigma):
    rng = np.random.default_rng(3)
    _, truth, _, labels = disk_cube(rng, H=1, W=1)
    plan = fusion.RegionPlan(labels=labels, shares=np.full(labels.shape, 1 / 16, np.float32),
                             correction=np.zeros((1, 1, labels.max() + 1), np.float32), share_sigma=0.0,
                             detail_sigma=0.0, detector_sigma=detector_sigma, detail_gain=1.0, choices={})
    share = plan.spread(truth.astype(np.float32))
    P, Q = labels.shape
    diagonal = np.zeros((P, Q))
    for k in np.ndindex(P, Q):  # the map is linear in the counts: its response to each pixel alone
        e = np.zeros((1, 1, P, Q), np.float32)
        e[(0, 0) + k] = 1
        diagonal[k] = plan.detail(e, share, detector_sigma)[(0, 0) + k]
    np.testing.assert_allclose(plan.detail_own(share, detector_sigma)[0, 0], diagonal, atol=1e-5)


def test_regions_fusion_beats_the_network_and_the_single_width_fusion(tmp_path):
    rng = np.random.default_rng(6)
    raw_np, truth, halo, labels = disk_cube(rng, dose=100.0)
    den_np = network_like(raw_np, halo)
    raw, den = write(tmp_path, "raw", raw_np, 8), write(tmp_path, "den", den_np, 8)
    sigma = sure.sure_sigma(raw_np.sum(axis=(2, 3)))
    plan = fusion.choose_regions(raw, den, labels, truth.mean(axis=(0, 1)), sectors=4, share_sigma=sigma / 2)
    regions = plan.apply(raw_np, den_np)
    bright = fusion.fuse_block(raw_np, den_np, sigma)
    err = lambda e: float(((e - truth) ** 2).mean())  # noqa: E731
    assert err(regions) < 0.8 * err(den_np)
    assert err(regions) < err(bright)
    # the dark-field ring's image (its contrast is what the network lost): better than both
    ring = labels // 4 == 2
    assert err_img(regions, truth, ring) < 0.5 * min(err_img(den_np, truth, ring), err_img(bright, truth, ring))


def err_img(est, truth, mask):
    return float(((est[..., mask].sum(-1) - truth[..., mask].sum(-1)) ** 2).mean())


def test_fusion_choice_leaves_a_useless_network_for_the_raw_counts_and_uses_a_good_one():
    rng = np.random.default_rng(7)
    lam = smooth_image(32)
    y = rng.poisson(lam).astype(np.float64)
    s1, s2, g, w = sure.fusion_choice(y, rng.uniform(0, 200, lam.shape))  # the "network" is noise
    assert w == 0 and g > 0.8 and s2 >= 1  # the counts, barely shrunk towards their mean
    # a blind-spot predictor: the mean of the 8 neighbours' counts (what SURE's approximation assumes)
    n8 = np.ones((3, 3)) / 8
    n8[1, 1] = 0
    net = ndimage.convolve(y, n8, mode="mirror")
    s1, s2, g, w = sure.fusion_choice(y, net)
    smooth = lambda a, s: ndimage.gaussian_filter(a, s, truncate=sure.TRUNCATE, mode="reflect") if s else a  # noqa: E731
    a = smooth(net, s1) if w else np.full_like(y, y.mean())
    chosen = ((a + g * smooth(y - a, s2) - lam) ** 2).sum()
    risks = {s: ((smooth(y, s) - lam) ** 2).sum() for s in sure.FUSION_S2}
    assert chosen <= 1.1 * min(risks.values())  # as good as the best width of the raw counts, or better
    assert chosen < 0.5 * ((net - lam) ** 2).sum()  # and much better than the network alone


def test_fusion_choice_takes_the_mean_where_the_truth_is_flat():
    """Total counts that do not vary over the scan (as a simulated cube's, or a thin specimen's): the mean of
    the counts beats every Gaussian width, and SURE finds it (``g`` near 0) instead of a wide Gaussian."""
    rng = np.random.default_rng(5)
    lam = np.full((32, 32), 20.0)
    y = rng.poisson(lam).astype(np.float64)
    wrong = 20 + 4 * np.sin(np.arange(32) / 3)[:, None] * np.ones((1, 32))  # a network with structure that is not there
    s1, s2, g, w = sure.fusion_choice(y, wrong)
    assert w == 0 and g < 0.5
    fused = y.mean() + g * sure.scan_smooth(y - y.mean(), s2)
    best_gaussian = min(((sure.scan_smooth(y, s) - lam) ** 2).sum() for s in sure.FUSION_S2)
    assert ((fused - lam) ** 2).sum() < 0.3 * best_gaussian
    # the risk is unbiased: averaged over draws it matches the true squared error of the same estimate
    est, true = [], []
    for _ in range(200):
        y = rng.poisson(lam).astype(np.float64)
        g, risk = sure.level_risk(y, 1.5)
        est.append(risk)
        true.append(((y.mean() + g * sure.scan_smooth(y - y.mean(), 1.5) - lam) ** 2).sum())
    assert abs(np.mean(est) - np.mean(true)) < 0.15 * np.mean(true) + 4 * np.std(np.subtract(est, true)) / np.sqrt(200)


def test_dispersion_z_is_near_standard_normal_for_flat_poisson_counts_and_large_for_a_signal():
    rng = np.random.default_rng(9)
    zs = [sure.dispersion_z(rng.poisson(20.0, (32, 32))) for _ in range(300)]
    assert abs(np.mean(zs)) < 0.25 and 0.8 < np.std(zs) < 1.25 and np.mean(np.greater(zs, 3)) < 0.02
    wave = 20 * (1 + 0.25 * np.sin(np.arange(32) / 2))[:, None] * np.ones((1, 32))  # a 25% signal
    assert sure.dispersion_z(rng.poisson(wave)) > 8
    assert sure.dispersion_z(2.0 * rng.poisson(10.0, (32, 32))) > 8  # counts in other units: not Poisson


def totals_fusion(raw_np: np.ndarray, den_np: np.ndarray, labels: np.ndarray, mean: np.ndarray):
    raw_img, den_img = fusion.region_images(da.from_array(raw_np), da.from_array(den_np), labels)
    mean_totals = np.bincount(labels.ravel(), weights=mean.ravel(), minlength=raw_img.shape[-1])
    fused, choices = fusion.top_down(raw_img, den_img, mean_totals, 4)
    return fused, choices


def test_top_down_keeps_a_flat_total_at_its_mean_and_follows_one_that_varies(monkeypatch):
    """Every simulated pattern here holds the same expected counts: the raw total image is Poisson noise
    around one level, so the fused total is that level at every position — a network whose totals wander
    by 10% does not get to pass that on to the rings. Where the totals do vary, SURE chooses as before."""
    rng = np.random.default_rng(10)
    raw_np, truth, halo, labels = disk_cube(rng, dose=100.0)
    wander = 1 + 0.1 * ndimage.gaussian_filter(rng.normal(size=raw_np.shape[:2]), 2)[..., None, None] / 0.14
    den_np = (truth * wander).astype(np.float32)
    mean = truth.mean(axis=(0, 1))
    fused, choices = totals_fusion(raw_np, den_np, labels, mean)
    assert choices["total_z"] <= fusion.FLAT_Z and choices["total"] == (0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(fused.sum(-1), raw_np.sum(axis=(2, 3), dtype=np.float64).mean(), rtol=1e-9)
    bf = labels // 4 == 0
    truth_bf = truth[..., bf].sum(-1)
    monkeypatch.setattr(fusion, "FLAT_Z", -np.inf)  # SURE's choice of the total, as before
    chosen, _ = totals_fusion(raw_np, den_np, labels, mean)
    err = lambda f: float(((f[..., :4].sum(-1) - truth_bf) ** 2).mean())  # noqa: E731
    assert err(fused) <= err(chosen)
    monkeypatch.undo()
    # totals that vary by 30% over the scan (a thickness ramp): far beyond Poisson, and followed
    ramp = (1 + 0.3 * np.linspace(-1, 1, raw_np.shape[0]))[:, None, None, None]
    raw_v = rng.poisson(truth * ramp).astype(np.float32)
    fused, choices = totals_fusion(raw_v, (truth * ramp).astype(np.float32), labels, mean)
    true_total = (truth * ramp).sum(axis=(2, 3))
    assert choices["total_z"] > 10 and choices["total"][3] == 1.0
    assert ((fused.sum(-1) - true_total) ** 2).mean() < 0.1 * true_total.var()
    # values that are not counts (the flat cube x 0.5): far less dispersed than Poisson, so SURE decides
    calls = []
    choose = fusion.fusion_choice
    monkeypatch.setattr(fusion, "fusion_choice", lambda *a, **k: calls.append(1) or choose(*a, **k))
    _, choices = totals_fusion(0.5 * raw_np, 0.5 * den_np, labels, 0.5 * mean)
    assert choices["total_z"] < -fusion.FLAT_Z and calls
    calls.clear()
    totals_fusion(raw_np, den_np, labels, mean)
    assert not calls  # and flat counts never reach it


def test_split_choice_follows_the_counts_where_the_network_splits_a_total_wrongly():
    rng = np.random.default_rng(8)
    whole = np.full((32, 32), 400.0)
    part = 0.5 + 0.2 * np.sin(2 * np.pi * np.arange(32) / 32)[:, None] * np.ones((1, 32))
    counts_part = rng.poisson(whole * part).astype(np.float64)
    counts_whole = counts_part + rng.poisson(whole * (1 - part))
    s, g, source = fusion.split_choice(counts_part, {"network": np.full(whole.shape, 0.5)}, counts_whole, whole)
    assert g > 0.5 and s >= 1  # the network's flat split is wrong; the smooth counts are trusted
    # a network whose split is right but noisy loses to the mean pattern's where the truth is flat
    flat = np.full(whole.shape, 0.5)
    counts_part = rng.poisson(whole * flat).astype(np.float64)
    noisy = np.clip(flat + rng.normal(0, 0.1, flat.shape), 0, 1)
    s, g, source = fusion.split_choice(counts_part, {"network": noisy, "mean": np.float64(0.5)},
                                       counts_part + rng.poisson(whole * (1 - flat)), whole)
    assert source == "mean"


def test_detector_regions_rings_and_sectors():
    labels = fusion.detector_regions((21, 21), (10.0, 10.0), 4.0, rings=(1.0, 1.2, 3.0), sectors=4)
    assert labels[10, 10] // 4 == 0 and labels[10, 19] // 4 == 2 and labels[0, 0] // 4 == 3
    assert len(np.unique(labels)) == 16
    assert set(np.unique(labels[8:13, 8:13] // 4)) == {0}


@pytest.mark.parametrize("halo", [1, 2])
def test_fusion_risk_is_exact_for_the_network_alone_and_conservative_for_the_correction(halo):
    """For a network that is its window's neighbours' mean (8 or 24), SURE of the smoothed network averages
    to the true squared error over Poisson draws (g = 0); with the raw residual's correction (g > 0) it
    overstates the error by about the credit SURE refuses that correction."""
    rng = np.random.default_rng(3)
    lam = smooth_image(48)
    n = 2 * halo + 1
    mean = np.full((n, n), 1 / (n * n - 1))
    mean[halo, halo] = 0
    smooth = lambda a, s: ndimage.gaussian_filter(a, s, truncate=sure.TRUNCATE, mode="reflect")  # noqa: E731
    est = {0.0: [], 0.5: []}
    true = {0.0: [], 0.5: []}
    other = []
    for _ in range(200):
        y = rng.poisson(lam).astype(np.float64)
        net = ndimage.convolve(y, mean, mode="mirror")  # the data path reflects as numpy: never the centre
        a = smooth(net, 1.0)
        for g in est:
            est[g].append(sure.fusion_risk(y, net, 1.0, 1.5, halo, g=g)[1])
            true[g].append(((a + g * smooth(y - a, 1.5) - lam) ** 2).sum())
        other.append(sure.fusion_risk(y, net, 1.0, 1.5, 3 - halo, g=0.0)[1])
    est0, true0 = np.array(est[0.0]), np.array(true[0.0])
    se = np.std(est0 - true0) / np.sqrt(len(est0))
    assert abs(est0.mean() - true0.mean()) < 4 * se + 0.02 * true0.mean()
    assert abs(np.mean(other) - true0.mean()) > 0.3 * true0.mean()  # the other window's weight is wrong
    assert np.mean(est[0.5]) > np.mean(true[0.5])  # the correction is never credited with more than it does


def test_share_width_is_chosen_below_the_cap_exact_shares_unsmoothed_noisy_ones_smoothed(tmp_path):
    """The network's shares within a region: kept as they are where they are exact (the disk moves across the
    scan, so smoothing them blurs it), smoothed up to the cap where they are noise around a smooth truth."""
    rng = np.random.default_rng(8)
    raw_np, truth, halo, labels = disk_cube(rng, dose=200.0, shift_amp=3.0)
    raw = write(tmp_path, "raw", raw_np, 8)
    mean = truth.mean(axis=(0, 1))
    exact = write(tmp_path, "exact", truth.astype(np.float32), 8)
    assert fusion.choose_regions(raw, exact, labels, mean, sectors=4, share_sigma=2.0).share_sigma == 0.0
    smooth = np.broadcast_to(mean, truth.shape)  # a scan-invariant truth, and a network whose shares are noise
    raw_s = write(tmp_path, "raw_s", rng.poisson(smooth).astype(np.float32), 8)
    noisy = write(tmp_path, "noisy", (smooth * rng.gamma(4.0, 0.25, smooth.shape)).astype(np.float32), 8)
    assert fusion.choose_regions(raw_s, noisy, labels, mean, sectors=4, share_sigma=2.0).share_sigma == 2.0
    assert fusion.choose_regions(raw_s, noisy, labels, mean, sectors=4, share_sigma=0.0).share_sigma == 0.0


# --- the Wiener step of the regions fusion ---------------------------------------------------------

@pytest.mark.parametrize("sectors", range(1, 9))
def test_sector_basis_is_orthonormal_and_its_first_harmonics_are_the_centre_of_mass(sectors):
    basis = fusion.sector_basis(sectors)
    np.testing.assert_allclose(basis @ basis.T, np.eye(sectors), atol=1e-12)
    np.testing.assert_allclose(basis[0], 1 / np.sqrt(sectors))
    if sectors >= 3:  # a disk moved along +x (the detector's columns) shows in the cosine row only
        P = 32
        ky, kx = np.mgrid[:P, :P]
        labels = fusion.detector_regions((P, P), (15.5, 15.5), 6.0, rings=(10.0,), sectors=sectors)
        disk = (np.hypot(ky - 15.5, kx - 18.5) < 6).astype(float)
        harmonics = basis @ np.bincount(labels.ravel(), disk.ravel(), minlength=sectors)[:sectors]
        assert harmonics[1] > 0.2 * harmonics[0] and abs(harmonics[2]) < 0.05 * harmonics[1]


def lattice(n: int = 48, level: float = 6.0) -> np.ndarray:
    """An image of atomic columns on a lattice whose period is not a divisor of the scan."""
    yy, xx = np.mgrid[:n, :n]
    a = 5.3
    return level * (1 + 0.9 * np.cos(2 * np.pi * (yy + 0.3 * xx) / a) * np.cos(2 * np.pi * (xx - 0.2 * yy) / a))


def test_scan_wiener_keeps_a_lattice_that_no_gaussian_keeps():
    rng = np.random.default_rng(11)
    truth = lattice()
    counts = rng.poisson(truth).astype(np.float64)
    kept = counts.copy()
    err = lambda e: float(np.sqrt(((e - truth) ** 2).mean()))  # noqa: E731
    best_gaussian = min(err(ndimage.gaussian_filter(counts, s, mode="reflect")) for s in (0.5, 1, 1.5, 2, 3))
    wiener = fusion.scan_wiener(counts, ndimage.gaussian_filter(counts, 1.0, mode="reflect"), counts.mean())
    assert err(wiener) < 0.8 * best_gaussian
    assert wiener.mean() == pytest.approx(counts.mean())
    np.testing.assert_array_equal(counts, kept)  # the input is left alone
    # a flat pilot: nothing but the counts' mean passes
    np.testing.assert_allclose(fusion.scan_wiener(counts, np.ones_like(counts), 1.0), counts.mean())


def test_regions_fusion_wiener_step_beats_the_fusion_without_it_on_a_lattice(tmp_path):
    rng = np.random.default_rng(12)
    raw_np, truth, halo, labels = disk_cube(rng, H=32, W=32, dose=60.0)
    den_np = network_like(raw_np, halo)
    raw, den = write(tmp_path, "raw", raw_np, 8), write(tmp_path, "den", den_np, 8)
    sigma = sure.sure_sigma(raw_np.sum(axis=(2, 3)))
    plans = {w: fusion.choose_regions(raw, den, labels, truth.mean(axis=(0, 1)), sectors=4, share_sigma=sigma / 2,
                                      wiener=w) for w in (False, True)}
    assert plans[True].describe()["wiener"] and "Wiener" in plans[True].summary()
    fused = {w: plan.apply(raw_np, den_np) for w, plan in plans.items()}
    ring = labels // 4 == 2  # the dark-field ring: a lattice-like halo
    assert err_img(fused[True], truth, ring) < 0.8 * err_img(fused[False], truth, ring)
    disk = labels // 4 == 0
    ky = np.arange(16)[:, None] - 7.5 + 0 * labels
    com = lambda c: (c[..., disk] * ky[disk]).sum(-1) / c[..., disk].sum(-1)  # noqa: E731
    com_err = {w: float(((com(f) - com(truth)) ** 2).mean()) for w, f in fused.items()}
    assert com_err[True] < com_err[False]



@pytest.mark.parametrize("merge", ["last", "middle"])
def test_regions_fusion_wiener_step_on_a_detector_missing_sectors(tmp_path, merge):
    """Small detectors: the last ring may hold fewer sectors than the others, or a sector no pixel at all. The
    rings that are whole take the step, the others keep their fused totals, every region keeps its total."""
    rng = np.random.default_rng(14)
    raw_np, truth, halo, labels = disk_cube(rng, H=16, W=16, dose=60.0)
    labels = labels.copy()
    gone = labels.max() if merge == "last" else 5
    labels[labels == gone] = gone - 1
    raw, den = write(tmp_path, "raw", raw_np, 8), write(tmp_path, "den", network_like(raw_np, halo), 8)
    plans = {w: fusion.choose_regions(raw, den, labels, truth.mean(axis=(0, 1)), sectors=4, share_sigma=1.0,
                                      wiener=w) for w in (False, True)}
    den_np = den[...]
    fused = {w: plan.fused_totals(den_np, 0, 0) for w, plan in plans.items()}
    ring = 1 if merge == "middle" else labels.max() // 4
    part = slice(4 * ring, min(4 * ring + 4, labels.max() + 1))
    np.testing.assert_allclose(fused[True][..., part], fused[False][..., part], rtol=1e-5)  # not whole: kept
    assert not np.allclose(fused[True][..., :4], fused[False][..., :4])  # the disk's ring took the step
    out = plans[True].apply(raw_np, den_np)
    np.testing.assert_allclose(plans[True].totals(out), np.maximum(fused[True], 0), rtol=1e-4, atol=1e-3)


def lattice_sectors(rng, n: int = 40, levels=(30.0, 20.0, 25.0, 15.0)):
    """One ring of four sectors whose totals hold a lattice (each sector its own level), and their counts."""
    truth = np.stack([lattice(n, 1.0) * lv for lv in levels], -1)
    return truth, rng.poisson(truth).astype(np.float64)


def test_wiener_blend_takes_more_of_the_wiener_where_the_fusion_blurred_a_lattice():
    rng = np.random.default_rng(21)
    truth, counts = lattice_sectors(rng)
    kept = counts.copy()
    fuse = lambda y: ndimage.gaussian_filter(y, (1.5, 1.5, 0), mode="reflect")  # noqa: E731  (loses the lattice)
    fused = fuse(counts)
    blend = fusion.wiener_blend(counts, fused, fuse, sectors=4)
    assert blend.shape == (1, 4) and np.all((blend >= 0.5) & (blend <= 1))
    assert blend.mean() > 0.75
    err = lambda a: float(((fusion.wiener_regions(counts, fused, 4, blend=a) - truth) ** 2).sum())  # noqa: E731
    assert err(blend) < 0.9 * err(0.5)
    np.testing.assert_array_equal(counts, kept)  # the input is left alone
    np.testing.assert_array_equal(blend, fusion.wiener_blend(counts, fused, fuse, sectors=4))  # seeded


def test_wiener_blend_keeps_the_even_mean_where_the_fusion_is_already_right():
    """An exact fused estimate: the Wiener of the raw counts only adds noise, and SURE would take less of it than
    half; the weight stays at the mean (a trained network's copy of its targets' noise is invisible to SURE)."""
    rng = np.random.default_rng(22)
    truth, counts = lattice_sectors(rng)
    blend = fusion.wiener_blend(counts, truth, lambda y: truth, sectors=4)
    np.testing.assert_array_equal(blend, 0.5)
    plain = fusion.wiener_regions(counts, truth, 4)
    np.testing.assert_allclose(fusion.wiener_regions(counts, truth, 4, blend=blend), plain)


# --- the network's shares matched to the data's mean pattern, ring by ring ----------------------------

def test_radial_gain_matches_the_network_mean_pattern_to_the_data_ring_by_ring():
    yy, xx = np.mgrid[:16, :16]
    r = np.hypot(yy - 7.5, xx - 7.5)
    data = np.exp(-r / 4)
    net = data * np.where(r >= 5, 3.0, 1.0)  # a dark field three times too bright
    net[r.astype(int) == 2] = 0  # a ring the network left empty keeps gain 1
    gain = fusion.radial_gain(data, net, fusion.detector_rings(data.shape, (7.5, 7.5)))
    assert gain.shape == data.shape
    np.testing.assert_allclose(gain[r >= 6], 1 / 3, rtol=1e-9)
    np.testing.assert_allclose(gain[r < 2], 1.0, rtol=1e-9)
    assert (gain[r.astype(int) == 2] == 1).all()
    # ring by ring, the corrected network holds the data's counts
    ring = r.astype(int)
    full = ring != 2
    np.testing.assert_allclose(np.bincount(ring[full], (net * gain)[full]), np.bincount(ring[full], data[full]))


def test_shares_take_the_radial_gain_where_the_network_is_radially_wrong_and_not_where_it_is_right(tmp_path):
    """A network whose patterns are right but for a radial ripple within the detector's regions: SURE takes the
    gain, the fused cube is closer to the truth and every region keeps its fused total. An exact network's
    gain is noise fitted to the counts: SURE charges its divergence and leaves the shares alone."""
    rng = np.random.default_rng(9)
    raw_np, truth, _, labels = disk_cube(rng, dose=300.0, shift_amp=0.5)
    raw = write(tmp_path, "raw", raw_np, 8)
    mean = raw_np.astype(np.float64).mean(axis=(0, 1))
    r = np.hypot(*(np.mgrid[:16, :16] - 7.5))
    rippled = (truth * (1 + 0.5 * np.cos(2 * np.pi * r / 2.5))).astype(np.float32)
    den = write(tmp_path, "rippled", rippled, 8)
    plan = fusion.choose_regions(raw, den, labels, mean, sectors=4, share_sigma=0.0, wiener=False)
    assert plan.choices["share_gain"] > 0 and plan.share_gain is not None
    assert "radial gain^" in plan.summary() and plan.describe()["share_gain_power"] == plan.choices["share_gain"]
    without = replace(plan, share_gain=None)
    fused, fused0 = plan.apply(raw_np, rippled), without.apply(raw_np, rippled)
    assert ((fused - truth) ** 2).sum() < 0.8 * ((fused0 - truth) ** 2).sum()
    np.testing.assert_allclose(plan.totals(fused), plan.totals(fused0), rtol=1e-4, atol=1e-3)
    exact = write(tmp_path, "exact", truth.astype(np.float32), 8)
    assert fusion.choose_regions(raw, exact, labels, mean, sectors=4, share_sigma=0.0,
                                 wiener=False).choices["share_gain"] == 0.0
