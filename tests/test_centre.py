"""model.centre: the network also reads the centre pattern's own counts, trained by Poisson thinning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stemdist.config import Config, ConfigError, load
from stemdist.config import apply as apply_overrides
from stemdist.data.tiles import Grid
from stemdist.run.inference import predict_block, takes_centre
from stemdist.train.module import Denoiser, averaged, split_weights

from .conftest import SMOKE, run_cli


@pytest.fixture
def npy_input(small_cube, tmp_path) -> Path:
    path = tmp_path / "cube.npy"
    np.save(path, zarr.open_array(str(small_cube / "noisy"), mode="r")[...])
    return path


def _module(centre: float, seed: int = 0) -> Denoiser:
    config = apply_overrides(Config(), {"model": {"base_width": 4, "depth": 2, "centre": centre},
                                        "train": {"warmup_epochs": 0, "min_samples": 0, "seed": seed}}, "test")
    return Denoiser(config.model, config.train)


def test_thinning_splits_the_counts_into_input_and_target():
    """The input's last channel is a binomial p-share of the centre's counts over p, the target the rest over
    1 - p: together exactly the counts, whole numbers, drawn anew each step and the same for the same step."""
    module = _module(0.5)
    counts = torch.poisson(torch.full((64, 1, 6, 5), 3.0))
    x = torch.rand(64, 8, 6, 5)
    xt, yt = module.thin(x, counts, 0)
    assert xt.shape == (64, 9, 6, 5) and torch.equal(xt[:, :8], x)
    y1, y2 = xt[:, 8:] * 0.5, yt * 0.5
    torch.testing.assert_close(y1 + y2, counts)
    assert torch.equal(y1, y1.round()) and (y1 >= 0).all() and (y2 >= 0).all()
    assert 0.4 < float(y1.sum() / counts.sum()) < 0.6
    again = module.thin(x, counts, 0)
    assert torch.equal(again[0], xt)
    assert not torch.equal(module.thin(x, counts, 1)[0], xt)
    blind = _module(0.0)
    assert blind.thin(x, counts, 0)[0] is x


def test_centre_with_cycles_of_blended_targets_is_refused():
    with pytest.raises(ConfigError, match="train.target: raw"):
        apply_overrides(Config(), {"model": {"centre": 0.5}, "train": {"cycles": 2}}, "test")
    apply_overrides(Config(), {"model": {"centre": 0.5}, "train": {"cycles": 2, "target": "raw"}}, "test")
    with pytest.raises(ConfigError, match="model.centre"):
        apply_overrides(Config(), {"model": {"centre": 1.0}}, "test")


def test_only_a_centre_network_reads_the_position_it_predicts():
    """predict_block gives a centre network the position's own pattern: changing it moves that position's
    output, where a blind-spot network's output there does not move."""
    block = torch.poisson(torch.full((6, 6, 8, 8), 2.0))
    grid = Grid(H=4, W=4, ty=4, tx=4, halo=1)
    moved = block.clone()
    moved[2, 2] += 5  # scan position (1, 1) of the tile
    for centre, reads in ((0.5, True), (0.0, False)):
        module = _module(centre).eval()
        assert takes_centre(module) is reads and takes_centre(averaged(module, [module.net.state_dict()] * 2)) is reads
        before = predict_block(module, block, grid, 0, "reflect", 16, torch.device("cpu"))
        after = predict_block(module, moved, grid, 0, "reflect", 16, torch.device("cpu"))
        change = (after - before).abs().sum(dim=(2, 3))
        assert bool(change[1, 1] > 1e-6) is reads


def test_a_run_with_centre_trains_predicts_and_refuses_fractional_counts(npy_input, tmp_path):
    """A real run: the network reads the centre (a 9-channel first layer), the cycle's cube is what its saved
    weights predict, and a cube of non-whole values is refused with one line naming the problem."""
    from stemdist.io.zarr_store import create_cube
    from stemdist.run.inference import infer

    run = tmp_path / "run"
    args = [*SMOKE, "--cycles", "1", "--epochs", "3", "--set", "data.tile=4", "--set", "model.centre=0.5"]
    run_cli("denoise", str(npy_input), "--out", str(run), *args)
    config = load(run / "config.yaml")
    assert config.model.centre == 0.5
    last, members = split_weights(torch.load(run / "weights" / "cycle_01.pt", map_location="cpu"))
    assert last["down.0.0.weight"].shape[1] == 9
    module = Denoiser(config.model, config.train)
    module.net.load_state_dict(last)
    raw = zarr.open_array(json.loads((run / "run.json").read_text())["raw"], mode="r")
    out = create_cube(str(tmp_path / "again.zarr"), None, tuple(raw.shape), (4, 4))
    infer(averaged(module, members), raw, None, 0.0, out, borders=config.data.borders, batch_size=16,
          device=torch.device("cpu"))
    cube = zarr.open_array(str(run / "denoised.zarr" / "cycle_01"), mode="r")[...]
    np.testing.assert_allclose(cube, zarr.open_array(str(tmp_path / "again.zarr"), mode="r")[...],
                               rtol=1e-5, atol=1e-5)

    fractional = tmp_path / "scaled.npy"
    np.save(fractional, np.load(npy_input).astype(np.float32) * 0.37)
    proc = run_cli("denoise", str(fractional), "--out", str(tmp_path / "bad"), *args, check=False)
    assert proc.returncode != 0
    assert "model.centre 0.5 splits each pattern's counts in two" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
