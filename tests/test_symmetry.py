"""train.augment: a jointly moved sample is the sample of the moved cube; the training step uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemdist.config import ConfigError, load
from stemdist.data.tiles import neighbour_offsets
from stemdist.train.model import UNet
from stemdist.train.module import Denoiser, OutputAverage
from stemdist.train.symmetry import ELEMENTS, augment, draw, element_of, elements, restore_patterns, transform_patterns


def moved_cube(a: np.ndarray, element) -> np.ndarray:
    """The cube ``(S, S, P, Q)`` with the scan and the detector moved alike: transposed, then flipped."""
    t, fi, fj = element
    b = a.transpose(1, 0, 3, 2) if t else a
    if fi:
        b = b[::-1, :, ::-1, :]
    if fj:
        b = b[:, ::-1, :, ::-1]
    return np.ascontiguousarray(b)


def sample(a: np.ndarray, halo: int, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([a[i + di, j + dj] for di, dj in neighbour_offsets(halo)])
    return torch.from_numpy(x)[None], torch.from_numpy(a[i, j].copy())[None, None]


@pytest.mark.parametrize("halo", [1, 2])
@pytest.mark.parametrize("element", ELEMENTS)
def test_a_jointly_moved_sample_is_the_moved_cubes_sample(halo, element):
    a = np.random.default_rng(0).random((9, 9, 6, 6)).astype(np.float32)
    x, y = sample(a, halo, 4, 4)  # the centre of the scan stays where it is under every element
    want_x, want_y = sample(moved_cube(a, element), halo, 4, 4)
    got_x, got_y = augment(x, y, "joint", halo, element)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    scan_x, scan_y = augment(x, y, "scan", halo, element)  # the neighbours move, the patterns do not
    assert torch.equal(scan_y, y) and torch.equal(scan_x, restore_patterns(want_x, element))
    assert torch.equal(restore_patterns(transform_patterns(x, element), element), x)


def test_groups_by_mode_and_detector_shape():
    assert elements("none", True) == (ELEMENTS[0],)
    assert len(elements("scan", False)) == 8 and len(elements("joint", True)) == 8
    assert elements("joint", False) == tuple(e for e in ELEMENTS if not e[0])  # no transpose of a 12 x 10 detector
    assert all(not element_of("joint", (1, 8, 12, 10), k)[0] for k in range(20))
    picks = {draw(0, step, 0) % 8 for step in range(200)}
    assert picks == set(range(8)) and draw(0, 5, 1) == draw(0, 5, 1) != draw(0, 5, 0)


def test_the_training_step_learns_from_the_moved_batch():
    config = load(None, {"model": {"base_width": 4, "depth": 2}, "train": {"augment": "joint", "seed": 3,
                                                                          "warmup_epochs": 0}})
    module = Denoiser(config.model, config.train)
    seen = []
    module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    x, y = torch.rand(2, 8, 8, 8), torch.rand(2, 1, 8, 8)
    module.training_step((x, y), 0)
    moved = element_of("joint", x.shape, draw(3, 0, 0))
    assert moved != ELEMENTS[0]  # this seed's first draw moves the batch
    assert torch.equal(seen[-1], augment(x, y, "joint", 1, moved)[0])


def test_joint_augmentation_with_the_mean_exp_head_is_refused():
    with pytest.raises(ConfigError, match="train.augment: joint"):
        load(None, {"model": {"head": "mean_exp"}, "train": {"augment": "joint"}})
    assert load(None, {"model": {"head": "mean_exp"}, "train": {"augment": "scan"}}).train.augment == "scan"
    with pytest.raises(ConfigError, match="model.mean_channel"):
        load(None, {"model": {"mean_channel": True}, "train": {"augment": "joint"}})
    with pytest.raises(ConfigError, match="train.augment"):
        load(None, {"train": {"augment": "rotate"}})


@pytest.mark.parametrize("mode", ["joint", "scan"])
def test_averaged_networks_each_see_the_cube_moved_another_way(mode):
    """Member k predicts the centre from the window moved by element k, put back: for ``joint`` that is the
    network run on the moved cube, its output moved back."""
    torch.manual_seed(0)
    a = np.random.default_rng(1).random((9, 9, 8, 8)).astype(np.float32)
    nets = [UNet(8, 2, 1).eval() for _ in range(4)]
    x, _ = sample(a, 1, 4, 4)
    with torch.no_grad():
        got = OutputAverage(nets, augment=mode, halo=1)(x)
        views = []
        for k, net in enumerate(nets):
            if mode == "joint":
                views.append(restore_patterns(net(sample(moved_cube(a, ELEMENTS[k]), 1, 4, 4)[0]), ELEMENTS[k]))
            else:
                views.append(net(augment(x, x, "scan", 1, ELEMENTS[k])[0]))
        plain = OutputAverage(nets)(x)
    assert torch.allclose(got, torch.stack(views).mean(0), atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)
