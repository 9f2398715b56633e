"""``stemdist export`` to .npy, py4DSTEM HDF5 and HyperSpy .hspy, re-opened by those libraries.

A calibrated cube comes from a HyperSpy file (written by HyperSpy), is converted and denoised once; its
run is exported, and HyperSpy / py4DSTEM open the exports. py4DSTEM runs in its own interpreter (numpy<2):
see tests/test_formats.py for how it is found.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from .conftest import SMOKE, run_cli
from .test_formats import need_formats, run_py4dstem

SCALES = {"scan_y": (3.0, "nm"), "scan_x": (2.0, "nm"), "det_y": (0.05, "1/nm"), "det_x": (0.04, "1/nm")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A denoised run whose input came from a calibrated HyperSpy file."""
    need_formats()
    import hyperspy.api as hs

    tmp = tmp_path_factory.mktemp("export")
    data = np.random.default_rng(7).poisson(2.0, (6, 5, 12, 10)).astype(np.uint16)
    s = hs.signals.Signal2D(data)
    for ax, name in zip(s.axes_manager._axes, ("y", "x", "ky", "kx"), strict=True):
        ax.name = name
    for ax, key in zip(s.axes_manager._axes, SCALES, strict=True):
        ax.scale, ax.units = SCALES[key]
    s.save(tmp / "in.hspy")
    run_cli("convert", str(tmp / "in.hspy"), str(tmp / "in.zarr"))
    run_cli("denoise", str(tmp / "in.zarr"), "--out", str(tmp / "run"), *SMOKE, "--cycles", "1",
            "--epochs", "1")
    return tmp / "run"


def _final(run: Path) -> np.ndarray:
    return zarr.open_group(str(run / "denoised.zarr"), mode="r")["final"][:]


def test_export_npy_from_run_dir(run_dir, tmp_path):
    run_cli("export", str(run_dir), str(tmp_path / "final.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "final.npy"), _final(run_dir))
    proc = run_cli("export", str(run_dir), str(tmp_path / "final.npy"), check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    run_cli("export", str(run_dir), str(tmp_path / "final.npy"), "--overwrite")


def test_export_hspy_opens_lazily_in_hyperspy(run_dir, tmp_path):
    import hyperspy.api as hs

    out = tmp_path / "final.hspy"
    run_cli("export", str(run_dir), str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = hs.load(out, lazy=True)
    assert s._lazy and isinstance(s, hs.signals.Signal2D)
    assert s.axes_manager.navigation_dimension == 2 and s.axes_manager.signal_dimension == 2
    assert s.data.shape == (6, 5, 12, 10)
    np.testing.assert_allclose(s.data.compute(), _final(run_dir))
    # HyperSpy's axes_manager lists x before y; calibrations come from the run's input cube
    am = s.axes_manager
    assert (am["x"].scale, am["x"].units) == SCALES["scan_x"]
    assert (am["y"].scale, am["y"].units) == SCALES["scan_y"]
    assert (am["kx"].scale, am["kx"].units) == SCALES["det_x"]
    assert (am["ky"].scale, am["ky"].units) == SCALES["det_y"]
    assert [a.size for a in am.navigation_axes] == [5, 6]


def test_export_cube_to_hspy_and_back_through_convert(run_dir, tmp_path):
    """Exporting the converted input and converting the export gives the same cube and calibration."""
    src = run_dir.parent / "in.zarr"
    run_cli("export", str(src), str(tmp_path / "in.hspy"))
    run_cli("convert", str(tmp_path / "in.hspy"), str(tmp_path / "again.zarr"))
    a, b = zarr.open_array(str(src), mode="r"), zarr.open_array(str(tmp_path / "again.zarr"), mode="r")
    np.testing.assert_array_equal(a[:], b[:])
    assert a.dtype == b.dtype
    for axis in SCALES:
        assert b.attrs["calibration"][axis]["scale"] == pytest.approx(a.attrs["calibration"][axis]["scale"])
        assert b.attrs["calibration"][axis]["units"] == a.attrs["calibration"][axis]["units"]


P4_READ = """
import sys, json, numpy as np, py4DSTEM
dc = py4DSTEM.read(sys.argv[1])
np.save(sys.argv[2], dc.data)
c = dc.calibration
print(json.dumps({"class": type(dc).__name__, "shape": list(dc.data.shape),
                  "R": [float(c.get_R_pixel_size()), c.get_R_pixel_units()],
                  "Q": [float(c.get_Q_pixel_size()), c.get_Q_pixel_units()]}))
"""


def test_export_h5_opens_as_py4dstem_datacube(run_dir, tmp_path):
    out = tmp_path / "final.h5"
    run_cli("export", str(run_dir), str(out))
    got = run_py4dstem(P4_READ, str(out), str(tmp_path / "back.npy"))
    assert got["class"] == "DataCube"
    assert got["shape"] == [6, 5, 12, 10]
    assert got["R"] == [SCALES["scan_y"][0], "nm"] and got["Q"] == [SCALES["det_y"][0], "1/nm"]
    np.testing.assert_array_equal(np.load(tmp_path / "back.npy"), _final(run_dir))


def test_export_h5_round_trips_through_stemdist(run_dir, tmp_path):
    """The py4DSTEM file is read back by stemdist itself (emdfile layout) with its calibration."""
    out = tmp_path / "final.emd"
    run_cli("export", str(run_dir), str(out))
    run_cli("convert", str(out), str(tmp_path / "back.zarr"))
    back = zarr.open_array(str(tmp_path / "back.zarr"), mode="r")
    np.testing.assert_array_equal(back[:], _final(run_dir))
    assert back.attrs["emd_class"] == "DataCube"
    assert back.attrs["calibration"]["det_x"]["scale"] == pytest.approx(SCALES["det_x"][0])
    json.dumps(dict(back.attrs))


def test_export_zspy_and_unknown_suffix_are_clear_errors(run_dir, tmp_path):
    proc = run_cli("export", str(run_dir), str(tmp_path / "x.zspy"), check=False)
    assert proc.returncode == 2 and "zarr<3" in proc.stderr and ".hspy" in proc.stderr
    assert not (tmp_path / "x.zspy").exists()
    proc = run_cli("export", str(run_dir), str(tmp_path / "x.tif"), check=False)
    assert proc.returncode == 2 and "cannot export" in proc.stderr
