"""Losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from stemdist.train.losses import pixel_weights, poisson_loss, poisson_nll, warmup_loss, znorm
from stemdist.train.model import UNet


def test_poisson_nll_by_hand():
    rate = torch.tensor([[[[1.0, 2.0], [0.5, 0.0]]]])
    counts = torch.tensor([[[[0.0, 3.0], [1.0, 2.0]]]])
    # mean of rate - counts * log(rate), rate clamped to 1e-8
    terms = [1.0 - 0.0, 2.0 - 3.0 * math.log(2.0), 0.5 - 1.0 * math.log(0.5), 1e-8 - 2.0 * math.log(1e-8)]
    assert math.isclose(poisson_nll(rate, counts).item(), sum(terms) / 4, rel_tol=1e-5)


def test_mean_and_sum_terms_by_hand():
    pred = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 4.0]]]])  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 2.0]]], [[[3.0, 3.0]]]])
    nll = poisson_nll(pred, target).item()
    mean_mse = ((1.0 - 1.0) ** 2 + (3.0 - 3.0) ** 2) / 2
    sum_mse = ((2.0 - 2.0) ** 2 + (6.0 - 6.0) ** 2) / 2
    assert math.isclose(poisson_loss(pred, target, 0.02, 0.01).item(), nll + 0.02 * mean_mse + 0.01 * sum_mse,
                        rel_tol=1e-6)
    target2 = target + torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])  # pattern 0: mean 1.5, sum 3
    nll2 = poisson_nll(pred, target2).item()
    expected = nll2 + 0.02 * ((1.0 - 1.5) ** 2) / 2 + 0.01 * ((2.0 - 3.0) ** 2) / 2
    assert math.isclose(poisson_loss(pred, target2, 0.02, 0.01).item(), expected, rel_tol=1e-6)
    assert math.isclose(poisson_loss(pred, target2).item(), nll2, rel_tol=1e-6)


def test_warmup_is_mse_of_z_normalised_tensors():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([2.0, 4.0, 6.0, 9.0])
    z = znorm(pred)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()  # unbiased, as torch.std
    assert math.isclose(z[0].item(), (1.0 - 2.5) / (std + 1e-6), rel_tol=1e-6)
    zt = (target - target.mean()) / (target.std() + 1e-6)
    assert math.isclose(warmup_loss(pred, target).item(), ((z - zt) ** 2).mean().item(), rel_tol=1e-6)
    assert warmup_loss(pred, 3 * pred + 7).item() < 1e-10  # invariant to scale and offset


def test_unet_matches_reference_size_and_handles_any_detector():
    assert sum(p.numel() for p in UNet().parameters()) == 4_366_945  # "about 4.37 M parameters"
    net = UNet(base_width=4, depth=3)
    out = net(torch.rand(2, 8, 13, 21))
    assert out.shape == (2, 1, 13, 21) and (out >= 0).all()


def test_pixel_weights_average_one_and_leave_the_poisson_minimiser_alone():
    mean = torch.tensor([[4.0, 1.0], [0.25, 1.0]])
    w = pixel_weights(mean, 1.0)
    assert math.isclose(w.mean().item(), 1.0, rel_tol=1e-6) and w[1, 0] > w[0, 1] > w[0, 0]
    assert torch.allclose(pixel_weights(mean, 0.0), torch.ones(2, 2))
    # per pixel, the weighted NLL is still smallest at rate = counts' mean
    counts = torch.tensor([[[[3.0, 1.0], [0.0, 2.0]]], [[[5.0, 1.0], [1.0, 0.0]]]])
    best = counts.mean(0, keepdim=True).clone().requires_grad_(True)
    poisson_nll(best.expand_as(counts), counts, w).backward()
    assert best.grad.abs().max().item() < 1e-6


def test_mean_channel_feeds_the_mean_patterns_level_and_keeps_it_with_the_weights(tmp_path):
    torch.manual_seed(0)
    net = UNet(8, 4, 2, mean_channel=True)
    assert net.down[0][0].in_channels == 9  # the 8 neighbours and the level
    x = torch.rand(3, 8, 20, 18)
    with pytest.raises(ValueError, match="set_mean_pattern"):
        net(x)
    mean = torch.rand(20, 18) + 0.1
    net.set_mean_pattern(mean)
    out = net(x)
    net.set_mean_pattern(mean * 7)  # the level is relative: the dose does not change it
    assert torch.allclose(net(x), out, atol=1e-6)
    net.set_mean_pattern(mean.flip(0))  # where the pattern is bright moves the output
    assert not torch.allclose(net(x), out, atol=1e-4)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    other = UNet(8, 4, 2, mean_channel=True)
    other.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.allclose(other(x), net(x))


def test_mean_exp_head_starts_at_the_mean_pattern_and_keeps_it_with_the_weights(tmp_path):
    net = UNet(8, 4, 2, head="mean_exp")
    mean = torch.rand(20, 18) + 0.1
    net.set_mean_pattern(mean)
    x = torch.rand(3, 8, 20, 18)
    assert torch.allclose(net(x)[:, 0], mean.expand(3, 20, 18))  # untrained: the mean pattern
    torch.save(net.state_dict(), tmp_path / "w.pt")
    other = UNet(8, 4, 2, head="mean_exp")
    other.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.equal(other.mean_pattern, net.mean_pattern) and torch.allclose(other(x), net(x))
    old = {k: v for k, v in UNet(8, 4, 2).state_dict().items() if k != "mean_pattern"}  # weights of 0.x
    UNet(8, 4, 2).load_state_dict(old)
    try:
        UNet(8, 4, 2, head="mean_exp")(x)
    except ValueError as exc:
        assert "set_mean_pattern" in str(exc)
    else:
        raise AssertionError("a mean_exp network without its mean pattern must refuse to run")
