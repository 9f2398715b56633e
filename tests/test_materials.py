"""The benchmark's simulated materials: abTEM multislice into normalised 64 x 64 patterns (tiny sizes here)."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest

from stemdist.bench import materials as mat
from stemdist.errors import InputError


@pytest.mark.skipif(importlib.util.find_spec("abtem") is None, reason='abTEM not installed ("stemdist[simulate]")')
@pytest.mark.parametrize("crystal", ["SrTiO3 [001]", "Si [110]", "MoS2 [001] monolayer", "Au [001]"])
def test_simulated_patterns_are_normalised_centred_and_vary_over_the_scan(crystal):
    clean = mat.simulate(mat.Material(crystal, (1, 1), 8.0, 0.5, phonon_configs=1))
    assert clean.ndim == 4 and clean.shape[2:] == (mat.DET, mat.DET) and min(clean.shape[:2]) >= 6
    np.testing.assert_allclose(clean.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    mean = clean.mean(axis=(0, 1))
    cy, cx = np.unravel_index(mean.argmax(), mean.shape)
    assert abs(cy - 31.5) < 6 and abs(cx - 31.5) < 6  # the bright-field disk on the optical axis
    r = np.hypot(*np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij"))
    adf = (clean * ((r > 16) & (r < 30))).sum(axis=(2, 3))
    assert adf.std() > 0.01 * adf.mean()  # atoms: the dark-field signal changes across the scan


def test_a_missing_cube_without_abtem_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mat, "_has", lambda module: False)
    with pytest.raises(InputError, match=r'pip install "stemdist\[simulate\]"'):
        mat.make("si110_024", tmp_path)
    assert not any(tmp_path.iterdir())


def test_each_material_has_a_wide_twin_and_a_fixed_distinct_noise_seed():
    for name in mat.CPU_SIZED:
        small, wide = mat.MATERIALS[name], mat.MATERIALS[f"{name}_wide"]
        assert wide.cells == (2 * small.cells[0], 2 * small.cells[1])
        assert (wide.step, wide.thickness, wide.crystal) == (small.step, small.thickness, small.crystal)
    assert set(mat.NOISE_SEED) == set(mat.MATERIALS)
    assert len(set(mat.NOISE_SEED.values())) == len(mat.NOISE_SEED)
    # the CPU-sized cubes keep the draws every stored result was made with (their sorted order)
    assert [mat.NOISE_SEED[n] for n in sorted(mat.CPU_SIZED)] == [0, 1, 2, 3]


def test_bench_materials_makes_the_wide_cubes_only_when_named(tmp_path, monkeypatch, capsys):
    made = []

    def fake_make(name, cache):  # records the request; a tiny cube stands in for the multislice
        made.append(name)
        path = cache / f"{name}.npy"
        np.save(path, np.ones((2, 2, 4, 4), np.float32) / 16)
        return path

    monkeypatch.setattr(mat, "_has", lambda module: True)
    monkeypatch.setattr(mat, "make", fake_make)
    parser = argparse.ArgumentParser()
    mat.add_arguments(parser)
    assert mat.run(parser.parse_args(["--cache", str(tmp_path)])) == 0
    assert sorted(made) == sorted(mat.CPU_SIZED)
    made.clear()
    assert mat.run(parser.parse_args(["--cache", str(tmp_path), "--only", "mos2_030_wide"])) == 0
    assert made == ["mos2_030_wide"]
    assert "materials: 1 cubes" in capsys.readouterr().out


def test_bench_quality_draws_each_materials_counts_from_its_fixed_seed(tmp_path):
    from stemdist.bench import quality

    clean = np.random.default_rng(5).random((6, 6, 8, 8)).astype(np.float32)
    clean /= clean.sum(axis=(2, 3), keepdims=True)
    for name in ("mos2_030", "mos2_030_wide"):
        np.save(tmp_path / f"{name}.npy", clean)
        args = argparse.Namespace(materials_cache=str(tmp_path), scan_crop=4)
        quality._simulated(args, name, 500.0, tmp_path / name)
        noisy = np.load(tmp_path / name / "npy" / "noisy.npy")
        expected = np.random.default_rng([mat.NOISE_SEED[name], 500]).poisson(clean[:4, :4].astype(np.float64) * 500)
        np.testing.assert_array_equal(noisy, expected)
