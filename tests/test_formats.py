"""Input formats through their own libraries, on real files.

Merlin ``.mib``, NanoMegas ``.blo`` and EMPAD metadata are the instrument-software files in
``shared/data/formats`` (RosettaSciIO's test data); HyperSpy and py4DSTEM files are written here by HyperSpy
and py4DSTEM themselves. Each is read, converted with ``stemdist convert`` and denoised in a smoke run.

py4DSTEM pins numpy<2, so it lives in its own interpreter: ``STEMDIST_PY4DSTEM_PYTHON`` (or
``.venv-py4dstem/`` in the repository). Without one the py4DSTEM tests skip, unless
``STEMDIST_REQUIRE_PY4DSTEM=1`` (CI) makes that a failure. Likewise ``STEMDIST_REQUIRE_FORMATS=1`` turns a
missing ``formats`` extra from a skip into a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from stemdist.errors import InputError
from stemdist.io.formats import AXES, axis_order, open_source

from .conftest import SHARED_DATA, SMOKE, run_cli

FORMATS = SHARED_DATA / "formats"
# the instrument files live in ../shared/data/formats; without it (a bare clone) those tests skip
needs_files = pytest.mark.skipif(not FORMATS.exists(), reason=f"{FORMATS} not present")
REPO = Path(__file__).resolve().parents[1]
QUICK = [*SMOKE, "--cycles", "1", "--epochs", "4", "--batch-size", "4"]  # one short cycle: about the data path


def _need(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"{what} not installed (pip install -e '.[formats]')"
        if os.environ.get("STEMDIST_REQUIRE_FORMATS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def need_formats() -> None:
    _need("rsciio", "RosettaSciIO (formats extra)")
    _need("hyperspy", "HyperSpy (formats extra)")
    _need("emdfile", "emdfile (formats extra)")


def py4dstem_python() -> str:
    """An interpreter that imports py4DSTEM (this one, $STEMDIST_PY4DSTEM_PYTHON or .venv-py4dstem)."""
    candidates = [os.environ.get("STEMDIST_PY4DSTEM_PYTHON"), str(REPO / ".venv-py4dstem" / "bin" / "python")]
    if importlib.util.find_spec("py4DSTEM") is not None:
        candidates.insert(0, sys.executable)
    for exe in candidates:
        if exe and Path(exe).exists():
            probe = subprocess.run([exe, "-c", "import py4DSTEM"], capture_output=True, text=True)
            if probe.returncode == 0:
                return exe
    reason = ("py4DSTEM (numpy<2) needs its own interpreter: python -m venv .venv-py4dstem && "
              ".venv-py4dstem/bin/pip install py4DSTEM==0.14.18, or set STEMDIST_PY4DSTEM_PYTHON")
    if os.environ.get("STEMDIST_REQUIRE_PY4DSTEM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def run_py4dstem(script: str, *args: str) -> dict:
    """Run ``script`` under py4DSTEM's interpreter; it prints one JSON line last."""
    exe = py4dstem_python()
    proc = subprocess.run([exe, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rsciio_read(plugin: str, path: Path, **kw) -> dict:
    module = importlib.import_module(plugin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.file_reader(str(path), lazy=False, **kw)


def unzip(name: str, dest: Path) -> Path:
    with zipfile.ZipFile(FORMATS / name) as zf:
        zf.extractall(dest)
    return dest


def convert(src: Path, out: Path) -> zarr.Array:
    run_cli("convert", str(src), str(out))
    arr = zarr.open_array(str(out), mode="r")
    assert arr.attrs["axes"] == AXES
    return arr


def smoke_denoise(cube: Path, run: Path) -> zarr.Array:
    """A short real denoise of the converted cube; returns the final array after basic checks."""
    run_cli("denoise", str(cube), "--out", str(run), *QUICK)
    final = zarr.open_group(str(run / "denoised.zarr"), mode="r")["final"]
    assert final.attrs["complete"] is True
    assert final.shape == zarr.open_array(str(cube), mode="r").shape
    values = final[:]
    assert np.isfinite(values).all() and (values >= 0).all() and values.sum() > 0
    return final


def tiled_npy(arr: np.ndarray, reps: tuple[int, int], path: Path) -> Path:
    """Real patterns repeated over the scan: the denoiser needs a scan of at least 3 x 3 positions."""
    np.save(path, np.tile(np.asarray(arr), (*reps, 1, 1)))
    return path


# ------------------------------------------------------------------------------------------ axis order
def test_axis_order_by_names_and_navigate_flags():
    assert axis_order(["Rx", "Ry", "Qx", "Qy"]) == [0, 1, 2, 3]
    assert axis_order(["Qx", "Qy", "Rx", "Ry"]) == [2, 3, 0, 1]
    assert axis_order(["ky", "y", "kx", "x"]) == [1, 3, 0, 2]
    assert axis_order([None] * 4, [False, False, True, True]) == [2, 3, 0, 1]
    assert axis_order([None] * 4, [True, True, False, False]) == [0, 1, 2, 3]
    assert axis_order([None] * 4) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------- Merlin
@needs_files
def test_merlin_mib_read_convert_denoise(tmp_path):
    need_formats()
    folder = unzip("Merlin_Single_Quad.zip", tmp_path / "mib")
    src = folder / "Quad_9_Frame_CounterDepth_24_Rows_256.mib"  # a 3 x 3 scan of 512 x 512 quad frames
    ref = rsciio_read("rsciio.quantumdetector", src)[0]
    arr, attrs = open_source(src)
    assert arr.shape == (3, 3, 512, 512) == ref["data"].shape
    assert arr.dtype == np.uint32 and arr.dtype.isnative  # 24-bit counter: big-endian words made native
    assert attrs["source_format"] == "quantumdetector"
    assert attrs["general"]["original_filename"] == src.name
    cube = convert(src, tmp_path / "quad.zarr")
    assert cube.shape == (3, 3, 512, 512) and cube.dtype == np.uint32
    np.testing.assert_array_equal(cube[:], ref["data"])
    assert cube.attrs["calibration"]["det_x"]["scale"] == 1.0

    # the 4 x 2 navigation files: shape (scan_y, scan_x) = (2, 4) and a 128-row ROI, values as RosettaSciIO
    nav = unzip("Merlin_navigation4x2_ROI.zip", tmp_path / "nav")
    for name, det in (("001_4x2_6bit.mib", (256, 256)), ("002_4x2_6bit_roi128.mib", (128, 256))):
        arr, _ = open_source(nav / name)
        ref = rsciio_read("rsciio.quantumdetector", nav / name)[0]["data"]
        assert arr.shape == (2, 4, *det)
        np.testing.assert_array_equal(arr.compute(), ref)
    # a 2 x 4 scan is too small to denoise (8 neighbours per position): convert says so, on one line
    proc = run_cli("convert", str(nav / "001_4x2_6bit.mib"), str(tmp_path / "small.zarr"), check=False)
    assert proc.returncode == 2 and "at least 3 x 3" in proc.stderr
    assert not (tmp_path / "small.zarr").exists()

    # denoise real Merlin patterns: the ROI file's 2 x 4 scan repeated to 4 x 4 (cheaper than 512 x 512)
    roi, _ = open_source(nav / "002_4x2_6bit_roi128.mib")
    npy = tiled_npy(roi.compute(), (2, 1), tmp_path / "roi_tiled.npy")
    tiled = convert(npy, tmp_path / "roi.zarr")
    assert tiled.shape == (4, 4, 128, 256)
    smoke_denoise(tmp_path / "roi.zarr", tmp_path / "run_mib")


@needs_files
def test_single_frame_series_is_refused_clearly(tmp_path):
    need_formats()
    folder = unzip("Merlin_Single_Quad.zip", tmp_path / "mib")
    with pytest.raises(InputError, match="no 4-D signal.*--scan-shape H W"):
        open_source(folder / "Single_9_Frame_CounterDepth_12_Rows_256.mib")  # 9 frames, no scan shape


@needs_files
def test_scan_shape_makes_a_merlin_series_a_scan(tmp_path):
    """`convert --scan-shape 3 3` on the real 9-frame Merlin series: frames in raster order; a shape that
    does not hold the 9 frames is refused in one line and writes nothing."""
    need_formats()
    folder = unzip("Merlin_Single_Quad.zip", tmp_path / "mib")
    src = folder / "Single_9_Frame_CounterDepth_12_Rows_256.mib"
    frames = rsciio_read("rsciio.quantumdetector", src)[0]["data"]
    assert frames.shape == (9, 256, 256)
    run_cli("convert", str(src), str(tmp_path / "s.zarr"), "--scan-shape", "3", "3")
    cube = zarr.open_array(str(tmp_path / "s.zarr"), mode="r")
    assert cube.shape == (3, 3, 256, 256) and cube.attrs["scan_shape_given"] == [3, 3]
    np.testing.assert_array_equal(cube[1, 2], frames[5])
    np.testing.assert_array_equal(cube[...].reshape(9, 256, 256), frames)
    for shape in (("2", "4"), ("3", "4")):
        proc = run_cli("convert", str(src), str(tmp_path / "bad.zarr"), "--scan-shape", *shape, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1
        assert f"--scan-shape {' '.join(shape)} makes" in lines[0] and "holds 9 frames" in lines[0]
        assert not (tmp_path / "bad.zarr").exists()


def test_scan_shape_on_a_flat_npy_stack(tmp_path):
    stack = np.random.default_rng(0).poisson(2.0, (12, 5, 6)).astype(np.uint16)
    np.save(tmp_path / "stack.npy", stack)
    proc = run_cli("convert", str(tmp_path / "stack.npy"), str(tmp_path / "no.zarr"), check=False)
    assert proc.returncode == 2 and "convert --scan-shape H W" in proc.stderr
    from stemdist.io.convert import convert as convert_api

    cube = convert_api(tmp_path / "stack.npy", tmp_path / "s.zarr", scan_shape=(3, 4))
    np.testing.assert_array_equal(cube[...], stack.reshape(3, 4, 5, 6))
    np.testing.assert_array_equal(np.load(tmp_path / "stack.npy"), stack)  # the source is untouched


# ------------------------------------------------------------------------------------------- blockfile
@needs_files
def test_blockfile_read_convert_denoise(tmp_path):
    need_formats()
    for name, shape in (("test1.blo", (3, 2, 144, 144)), ("test2.blo", (2, 3, 5, 5))):
        ref = rsciio_read("rsciio.blockfile", FORMATS / name)[0]
        arr, attrs = open_source(FORMATS / name)
        assert arr.shape == shape == ref["data"].shape
        np.testing.assert_array_equal(arr.compute(), ref["data"])
        cal = attrs["calibration"]
        assert [cal[a]["name"] for a in AXES] == ["y", "x", "dy", "dx"]
        assert cal["scan_x"]["units"] == "nm"
        assert cal["scan_x"]["scale"] == pytest.approx(ref["axes"][1]["scale"])
        assert cal["det_y"]["scale"] == pytest.approx(ref["axes"][2]["scale"])
        json.dumps(attrs)  # stored as Zarr attributes
    proc = run_cli("convert", str(FORMATS / "test1.blo"), str(tmp_path / "b.zarr"), check=False)
    assert proc.returncode == 2 and "3 x 2" in proc.stderr
    # denoise real blockfile patterns: test1's 3 x 2 scan repeated to 3 x 4
    arr, _ = open_source(FORMATS / "test1.blo")
    tiled = convert(tiled_npy(arr.compute(), (1, 2), tmp_path / "blo.npy"), tmp_path / "blo.zarr")
    assert tiled.shape == (3, 4, 144, 144) and tiled.dtype == np.uint8
    smoke_denoise(tmp_path / "blo.zarr", tmp_path / "run_blo")


# ----------------------------------------------------------------------------------------------- EMPAD
@needs_files
def test_empad_read_convert_denoise(tmp_path):
    need_formats()
    xml = tmp_path / "map4x4.xml"
    shutil.copy(FORMATS / "map4x4.xml", xml)
    xml.chmod(0o644)
    # the .raw the xml names, written from the xml's sizes as RosettaSciIO's tests do: 4 x 4 frames of
    # 128 x 130 float32 (the last 2 rows of each frame are the detector's metadata footer)
    rng = np.random.default_rng(3)
    frames = np.zeros((16, 130, 128), dtype="<f4")
    frames[:, :128] = rng.poisson(0.05, (16, 128, 128))
    frames[:, 128:] = 7.0  # footer: not counts, must be dropped
    frames.tofile(tmp_path / "scan_x4_y4.raw")
    ref = rsciio_read("rsciio.empad", xml)[0]
    arr, attrs = open_source(xml)
    assert arr.shape == (4, 4, 128, 128) == ref["data"].shape
    np.testing.assert_array_equal(arr.compute(), frames[:, :128].reshape(4, 4, 128, 128))
    cal = attrs["calibration"]
    assert cal["scan_x"]["units"] == ref["axes"][1]["units"] and cal["scan_x"]["units"]  # from the xml's FOV
    assert cal["scan_x"]["scale"] == pytest.approx(ref["axes"][1]["scale"])
    cube = convert(xml, tmp_path / "empad.zarr")
    assert cube.shape == (4, 4, 128, 128) and cube.dtype == np.float32
    assert cube.attrs["calibration"]["scan_y"]["scale"] == pytest.approx(ref["axes"][0]["scale"])
    np.testing.assert_array_equal(cube[:], ref["data"])
    smoke_denoise(tmp_path / "empad.zarr", tmp_path / "run_empad")


# -------------------------------------------------------------------------------------------- HyperSpy
def _hyperspy_signal(rng):
    import hyperspy.api as hs

    data = rng.poisson(1.5, (5, 6, 12, 10)).astype(np.uint16)
    s = hs.signals.Signal2D(data)
    for ax, (name, scale, units) in zip(s.axes_manager._axes, [("y", 3.0, "nm"), ("x", 2.0, "nm"),
                                                              ("ky", 0.05, "1/nm"), ("kx", 0.04, "1/nm")],
                                        strict=True):
        ax.name, ax.scale, ax.units = name, scale, units
    return s, data


def test_hspy_read_convert_denoise(tmp_path):
    need_formats()
    s, data = _hyperspy_signal(np.random.default_rng(4))
    s.save(tmp_path / "sig.hspy")
    arr, attrs = open_source(tmp_path / "sig.hspy")
    assert arr.shape == (5, 6, 12, 10)
    np.testing.assert_array_equal(arr.compute(), data)
    cal = attrs["calibration"]
    assert [cal[a]["name"] for a in AXES] == ["y", "x", "ky", "kx"]
    assert [cal[a]["scale"] for a in AXES] == pytest.approx([3.0, 2.0, 0.05, 0.04])
    cube = convert(tmp_path / "sig.hspy", tmp_path / "sig.zarr")
    np.testing.assert_array_equal(cube[:], data)
    assert cube.attrs["calibration"]["det_x"]["units"] == "1/nm"
    smoke_denoise(tmp_path / "sig.zarr", tmp_path / "run_hspy")


def test_zspy_needs_zarr2(tmp_path):
    need_formats()
    store = tmp_path / "x.zspy"
    store.mkdir()
    with pytest.raises(InputError, match="zspy|RosettaSciIO"):
        open_source(store)


# -------------------------------------------------------------------------------------------- py4DSTEM
P4_WRITE = """
import sys, json, numpy as np, py4DSTEM
data = np.random.default_rng(6).poisson(2.0, (6, 5, 16, 12)).astype(np.uint16)
dc = py4DSTEM.DataCube(data=data, name="experiment")
dc.calibration.set_R_pixel_size(1.5); dc.calibration.set_R_pixel_units("nm")
dc.calibration.set_Q_pixel_size(0.02); dc.calibration.set_Q_pixel_units("A^-1")
py4DSTEM.save(sys.argv[1], dc, mode="o")
np.save(sys.argv[2], data)
print(json.dumps({"version": py4DSTEM.__version__}))
"""


def test_py4dstem_read_convert_denoise(tmp_path):
    need_formats()
    run_py4dstem(P4_WRITE, str(tmp_path / "p4.h5"), str(tmp_path / "p4.npy"))
    data = np.load(tmp_path / "p4.npy")
    arr, attrs = open_source(tmp_path / "p4.h5")
    assert arr.shape == (6, 5, 16, 12)
    np.testing.assert_array_equal(arr.compute(), data)
    assert attrs["emd_class"] == "DataCube" and attrs["source_axes"] == ["Rx", "Ry", "Qx", "Qy"]
    assert attrs["calibration"]["scan_x"] == {"name": "Ry", "units": "nm", "offset": 0.0, "scale": 1.5}
    assert attrs["calibration"]["det_y"]["scale"] == pytest.approx(0.02)
    assert attrs["py4dstem_calibration"]["Q_pixel_units"] == "A^-1"
    cube = convert(tmp_path / "p4.h5", tmp_path / "p4.zarr")
    np.testing.assert_array_equal(cube[:], data)
    smoke_denoise(tmp_path / "p4.zarr", tmp_path / "run_p4")


def test_emd_array_with_detector_axes_first_is_transposed(tmp_path):
    """An EMD array (written by emdfile) whose dims are (Qx, Qy, Rx, Ry): read back as (Rx, Ry, Qx, Qy)."""
    need_formats()
    import emdfile

    data = np.arange(6 * 7 * 4 * 5, dtype=np.uint16).reshape(6, 7, 4, 5)  # (Qx, Qy, Rx, Ry)
    a = emdfile.Array(data=data, name="cube", dims=[0.1, 0.1, 2.0, 2.0], dim_names=["Qx", "Qy", "Rx", "Ry"],
                      dim_units=["A^-1", "A^-1", "nm", "nm"])
    emdfile.save(str(tmp_path / "q_first.emd"), a, mode="w")
    arr, attrs = open_source(tmp_path / "q_first.emd")
    assert arr.shape == (4, 5, 6, 7)
    np.testing.assert_array_equal(arr.compute(), data.transpose(2, 3, 0, 1))
    assert attrs["source_axes"] == ["Rx", "Ry", "Qx", "Qy"]
    assert attrs["calibration"]["scan_y"]["units"] == "nm"
    assert attrs["calibration"]["det_x"]["scale"] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------- missing extra
@needs_files
def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    from stemdist import cli

    monkeypatch.setitem(sys.modules, "rsciio.blockfile", None)  # as if RosettaSciIO were not installed
    with pytest.raises(InputError, match=r'pip install "stemdist\[formats\]"'):
        open_source(FORMATS / "test2.blo")
    assert cli.main(["convert", str(FORMATS / "test2.blo"), "/nonexistent/out.zarr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stemdist: error:") and 'pip install "stemdist[formats]"' in err
    assert len(err.splitlines()) == 1
