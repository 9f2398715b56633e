"""stemdist.denoise on the objects microscopists hold: numpy, dask, HyperSpy signals, py4DSTEM DataCubes.

Each round trip runs a real (short) run and checks that the result is the run's final cube, of the input's
kind, with the input's axes and calibrations, lazy where the input was, and that the input is untouched.
"""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr

import stemdist
from stemdist.errors import InputError
from stemdist.io.objects import source
from stemdist.io.synth import synth

from .test_formats import need_formats, run_py4dstem

QUICK = dict(config="smoke", cycles=1, epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> np.ndarray:
    path = tmp_path_factory.mktemp("objects") / "cube.zarr"
    synth(path, (10, 9), (16, 16), dose=100.0, seed=3)
    return zarr.open_array(str(path / "noisy"), mode="r")[...]


def _final(run) -> np.ndarray:
    return zarr.open_array(str(run / "denoised.zarr" / "final"), mode="r")[...]


def test_numpy_in_numpy_out(counts, tmp_path):
    given = counts.copy()
    out = stemdist.denoise(given, tmp_path / "run", **QUICK)
    assert isinstance(out, np.ndarray) and out.shape == counts.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, _final(tmp_path / "run"))
    np.testing.assert_array_equal(given, counts)  # the user's array is untouched
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["input"] == f"numpy array {counts.shape} {counts.dtype}"


def test_dask_in_lazy_dask_out(counts, tmp_path):
    lazy = da.from_array(counts, chunks=(5, 3, 16, 16))
    out = stemdist.denoise(lazy, tmp_path / "run", **QUICK)
    assert isinstance(out, da.Array) and out.shape == counts.shape
    np.testing.assert_array_equal(out.compute(), _final(tmp_path / "run"))
    assert out.chunks[0][0] == zarr.open_array(str(tmp_path / "run" / "denoised.zarr" / "final")).chunks[0]


def _signal(counts: np.ndarray, lazy: bool):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(counts)
    for ax, (name, units, scale, offset) in zip(
            s.axes_manager._axes, [("y", "nm", 0.024, 1.0), ("x", "nm", 0.03, -2.0),
                                   ("ky", "1/nm", 0.5, -4.0), ("kx", "1/nm", 0.25, -2.0)], strict=True):
        ax.name, ax.units, ax.scale, ax.offset = name, units, scale, offset
    s.metadata.General.title = "SrTiO3 scan"
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 300.0)
    return s.as_lazy() if lazy else s


def _axes(s) -> list[tuple]:
    return [(a.name, a.units, a.scale, a.offset, a.size, a.navigate) for a in s.axes_manager._axes]


@pytest.mark.parametrize("lazy", [False, True])
def test_hyperspy_signal_round_trip_keeps_axes_and_metadata(counts, tmp_path, lazy):
    need_formats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = _signal(counts, lazy)
        before = _axes(s)
        out = stemdist.denoise(s, tmp_path / "run", **QUICK)
    assert type(out) is type(s)
    assert bool(out._lazy) is lazy and isinstance(out.data, da.Array) is lazy
    assert _axes(out) == before == _axes(s)
    assert out.metadata.General.title == "SrTiO3 scan (stemdist)" and s.metadata.General.title == "SrTiO3 scan"
    assert out.metadata.Acquisition_instrument.TEM.beam_energy == 300.0
    np.testing.assert_array_equal(np.asarray(out.data), _final(tmp_path / "run"))
    np.testing.assert_array_equal(np.asarray(s.data), counts)
    recorded = json.loads((tmp_path / "run" / "input.zarr" / "zarr.json").read_text())["attributes"]
    assert recorded["calibration"]["scan_x"] == {"name": "x", "units": "nm", "scale": 0.03, "offset": -2.0}
    assert recorded["calibration"]["det_y"] == {"name": "ky", "units": "1/nm", "scale": 0.5, "offset": -4.0}


def test_py4dstem_datacube_round_trip_keeps_calibration():
    """In py4DSTEM's own interpreter (numpy<2): a DataCube opened as a source and rebuilt from a result."""
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    got = run_py4dstem(f"""
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, py4DSTEM
from stemdist.io.objects import source
dc = py4DSTEM.DataCube(data=np.arange(4 * 5 * 6 * 7, dtype=np.float32).reshape(4, 5, 6, 7), name="scan")
dc.calibration.set_R_pixel_size(0.3); dc.calibration.set_R_pixel_units("A")
dc.calibration.set_Q_pixel_size(0.02); dc.calibration.set_Q_pixel_units("A^-1")
src = source(dc)
out = src.rebuild(np.asarray(src.array) * 2)
print(json.dumps(dict(type=type(out).__name__, same=bool((out.data == 2 * dc.data).all()), name=out.name,
                      r=out.calibration.get_R_pixel_size(), ru=out.calibration.get_R_pixel_units(),
                      q=out.calibration.get_Q_pixel_size(), qu=out.calibration.get_Q_pixel_units(),
                      shape=list(src.array.shape), attrs=src.attrs)))
""")
    assert got["type"] == "DataCube" and got["same"] and got["name"] == "scan_stemdist"
    assert (got["r"], got["ru"], got["q"], got["qu"]) == (0.3, "A", 0.02, "A^-1")
    assert got["shape"] == [4, 5, 6, 7]
    assert got["attrs"]["calibration"]["det_x"] == {"name": "Qy", "units": "A^-1", "scale": 0.02, "offset": 0.0}


@pytest.mark.parametrize("obj,says", [
    (np.zeros((4, 5, 6)), "shape (4, 5, 6)"),
    (da.zeros((2, 3, 4, 5, 6)), "shape (2, 3, 4, 5, 6)"),
    ([[1, 2], [3, 4]], "cannot denoise a builtins.list"),
])
def test_objects_stemdist_cannot_take_are_named(obj, says):
    with pytest.raises(InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        source(obj)


def test_a_signal_that_is_not_a_4d_scan_is_refused(counts):
    need_formats()
    import hyperspy.api as hs

    with pytest.raises(InputError, match="1 navigation and 2 signal dimensions"):
        source(hs.signals.Signal2D(counts[0]))


def test_bad_values_in_an_object_are_refused_and_the_object_kept(counts, tmp_path):
    bad = counts.astype(np.float32)
    bad[2, 3, 4, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        stemdist.denoise(bad, tmp_path / "run", **QUICK)
    assert np.isnan(bad[2, 3, 4, 5]) and np.isnan(bad).sum() == 1  # the user's array is as it was
