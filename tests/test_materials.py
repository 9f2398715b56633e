"""The benchmark's simulated materials: abTEM multislice into normalised 64 x 64 patterns (tiny sizes here)."""

from __future__ import annotations

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
