"""Readers that open a 4D-STEM source lazily as a dask array, whatever its file format.

Every reader returns ``(array, attrs)``: a dask array shaped ``(scan_y, scan_x, det_y, det_x)`` that
reads the file on demand, and attributes worth recording (source, axes, calibrations).

Detector and HyperSpy formats (Merlin ``.mib``, NanoMegas ``.blo``, EMPAD ``.xml``, ``.hspy``, ``.zspy``)
are read by RosettaSciIO, HyperSpy's I/O library; py4DSTEM / EMD 1.0 files (``emdfile``) are read with
h5py, following the EMD layout. Both need the optional extra ``formats``.
"""

from __future__ import annotations

import importlib
import math
import zipfile
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..errors import InputError

AXES = ["scan_y", "scan_x", "det_y", "det_x"]
FORMATS_EXTRA = 'pip install "stemdist[formats]"'

# suffix -> (RosettaSciIO plugin, format name)
RSCIIO_READERS: dict[str, tuple[str, str]] = {
    ".mib": ("rsciio.quantumdetector", "Quantum Detectors Merlin .mib"),
    ".blo": ("rsciio.blockfile", "NanoMegas blockfile .blo"),
    ".xml": ("rsciio.empad", "EMPAD .xml/.raw"),
    ".hspy": ("rsciio.hspy", "HyperSpy .hspy"),
    ".zspy": ("rsciio.zspy", "HyperSpy .zspy"),
}
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".emd", ".nxs")

# axis names that say "probe position" or "detector pixel" (lower case)
_SCAN_NAMES = {"rx", "ry", "r_x", "r_y", "x", "y", "scan_x", "scan_y", "scan x", "scan y", "probe_x",
               "probe_y", "nav_x", "nav_y", "real_x", "real_y"}
_DET_NAMES = {"qx", "qy", "q_x", "q_y", "kx", "ky", "k_x", "k_y", "dx", "dy", "det_x", "det_y", "sig_x",
              "sig_y", "height", "width", "detector_x", "detector_y"}


def require(module: str, what: str):
    """Import an optional dependency, or raise an InputError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise InputError(f"{what} needs the optional dependency {missing!r}, which is not installed; "
                         f"install the formats extra: {FORMATS_EXTRA}") from None


def _plain(value: Any) -> Any:
    """A JSON-serialisable copy (numpy scalars to Python numbers, NaN to None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace")
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def axis_order(names: list[str | None], navigate: list[bool | None] | None = None) -> list[int]:
    """The permutation that brings axes into (scan_y, scan_x, det_y, det_x) order.

    Axis names decide when they say clearly which axes are probe positions and which detector pixels
    (py4DSTEM's Rx/Ry/Qx/Qy, HyperSpy's x/y/kx/ky, ...); otherwise HyperSpy's ``navigate`` flags do
    (navigation axes are the scan). Axes keep their relative order within each group.
    """
    lowered = [(n or "").strip().lower() for n in names]
    scan = [i for i, n in enumerate(lowered) if n in _SCAN_NAMES]
    det = [i for i, n in enumerate(lowered) if n in _DET_NAMES]
    if len(scan) == 2 and len(det) == 2:
        return scan + det
    if navigate is not None and all(v is not None for v in navigate):
        nav = [i for i, v in enumerate(navigate) if v]
        sig = [i for i, v in enumerate(navigate) if not v]
        if len(nav) == 2 and len(sig) == 2:
            return nav + sig
    return list(range(len(names)))


def _native(arr: da.Array) -> da.Array:
    """Big-endian detector words (Merlin 24-bit, ...) become native-endian numbers."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _npy_header(fp) -> tuple[tuple[int, ...], np.dtype, bool]:
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return shape, dtype, fortran


def _read_npy(path: Path) -> da.Array:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise InputError(f"{path}: not a NumPy .npy file (it does not start with the .npy header; "
                         f"first bytes {magic!r})")
    try:
        data = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    return da.from_array(data, chunks={3: (64, -1, -1), 4: (8, 8, -1, -1)}.get(data.ndim, data.shape))


def _read_npz(path: Path, key: str | None) -> da.Array:
    """Memory-map an uncompressed member of the archive; a compressed one must be inflated once."""
    with zipfile.ZipFile(path) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key is None:
            if len(names) != 1:
                raise InputError(f"{path}: holds arrays {names}; choose one with --dataset KEY")
            key = names[0]
        if key not in names:
            raise InputError(f"{path}: no array {key!r} (it holds {names})")
        info = zf.getinfo(key + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                start = info.header_offset + 30 + name_len + extra_len
                raw.seek(start)
                shape, dtype, fortran = _npy_header(raw)
                offset = raw.tell()
            data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")
        else:
            data = np.load(path)[key]  # compressed members cannot be memory-mapped
    return da.from_array(data, chunks=(8, 8, -1, -1) if data.ndim == 4 else data.shape)


def _h5_datasets(h5file) -> list[str]:
    import h5py

    found: list[str] = []
    h5file.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


def _h5_chunks(dset) -> tuple[int, ...] | str:
    """Read whole HDF5 chunks (or slabs of 8 x 8 probe positions from a contiguous dataset)."""
    if dset.ndim != 4:
        return dset.shape
    if dset.chunks is not None:
        return tuple(max(c, min(8, s)) if i < 2 else s for i, (c, s) in enumerate(zip(dset.chunks, dset.shape,
                                                                                       strict=True)))
    return (8, 8, -1, -1)


def _is_hyperspy_h5(f) -> bool:
    fmt = f.attrs.get("file_format", b"")
    return (fmt.decode() if isinstance(fmt, bytes) else str(fmt)) == "HyperSpy"


def _emd_value(dset) -> Any:
    value = dset[()]
    return value.decode() if isinstance(value, bytes) else value


def _emd_calibration(f, key: str) -> dict[str, Any]:
    """py4DSTEM's Calibration metadata (pixel sizes and units) stored in the array's EMD root."""
    root = key.split("/")[0]
    for path in (f"{root}/metadatabundle/calibration", f"{key.rsplit('/', 1)[0]}/metadatabundle/calibration"):
        if path in f:
            grp = f[path]
            return {k: _plain(_emd_value(grp[k])) for k in ("R_pixel_size", "R_pixel_units", "Q_pixel_size",
                                                           "Q_pixel_units", "QR_flip") if k in grp}
    return {}


def _read_hdf5(path: Path, key: str | None) -> tuple[da.Array, dict[str, Any]]:
    """Plain HDF5 datasets, and EMD 1.0 arrays written by py4DSTEM / emdfile (DataCube).

    An EMD array keeps its axis names (``dim0``..``dim3``: Rx, Ry, Qx, Qy for a py4DSTEM DataCube) and
    py4DSTEM's calibration; both are used to order the axes and are recorded as attributes.
    """
    import h5py

    f = h5py.File(path, "r")  # kept open for the lifetime of the dask graph
    if _is_hyperspy_h5(f):
        f.close()
        return _read_rsciio(path, key, "rsciio.hspy", "HyperSpy HDF5")
    if key is None:
        four_d = [n for n in _h5_datasets(f) if f[n].ndim == 4]
        if len(four_d) != 1:
            raise InputError(f"{path}: found 4-D datasets {four_d}; choose one with --dataset KEY")
        key = four_d[0]
    if key not in f:
        raise InputError(f"{path}: no dataset {key!r} (it holds {_h5_datasets(f)})")
    node = f[key]
    if isinstance(node, h5py.Group) and "data" in node:  # --dataset named the EMD array's group
        key = f"{key.rstrip('/')}/data"
        node = f[key]
    dset = node
    arr = da.from_array(dset, chunks=_h5_chunks(dset))
    attrs: dict[str, Any] = {"source_format": "hdf5"}
    parent = dset.parent
    group_type = parent.attrs.get("emd_group_type", b"")
    group_type = group_type.decode() if isinstance(group_type, bytes) else str(group_type)
    if group_type == "array" and dset.ndim == 4 and all(f"dim{i}" in parent for i in range(4)):
        dims = [parent[f"dim{i}"] for i in range(4)]
        names = [str(_plain(d.attrs.get("name", f"dim{i}"))) for i, d in enumerate(dims)]
        units = [str(_plain(d.attrs.get("units", ""))) for d in dims]
        vectors = [np.asarray(d[: min(2, d.shape[0])], dtype=float) if d.shape else np.zeros(1) for d in dims]
        order = axis_order(names)
        arr = arr.transpose(order)
        calib = {}
        for axis, i in zip(AXES, order, strict=True):
            v = vectors[i]
            calib[axis] = {"name": names[i], "units": units[i], "offset": float(v[0]) if v.size else 0.0,
                           "scale": float(v[1] - v[0]) if v.size > 1 else 1.0}
        klass = _plain(parent.attrs.get("python_class", "Array"))
        attrs.update({"source_format": "emd", "emd_class": klass, "source_axes": [names[i] for i in order],
                      "calibration": calib})
        p4 = _emd_calibration(f, key)
        if p4:
            attrs["py4dstem_calibration"] = p4
    return _native(arr), attrs


def _read_rsciio(path: Path, key: str | None, plugin: str, what: str, stack: bool = False
                 ) -> tuple[da.Array, dict[str, Any]]:
    """Read a file lazily through RosettaSciIO; order its axes; keep its calibrations. With ``stack`` a
    series of frames without a scan shape, ``(frames, det_y, det_x)``, is returned as it is."""
    reader = require(plugin, f"reading {what} files").file_reader
    try:
        signals = reader(str(path), lazy=True)
    except Exception as exc:  # readers raise many types for damaged or foreign files
        if plugin == "rsciio.zspy" and "zarr" in f"{type(exc).__name__} {exc}".lower():
            raise InputError(f"{path}: RosettaSciIO's .zspy reader needs zarr<3, but stemdist uses zarr 3 "
                             f"({exc}); save the signal as .hspy in HyperSpy instead") from None
        raise InputError(f"{path}: RosettaSciIO could not read it as {what} "
                         f"({type(exc).__name__}: {exc})") from None
    four_d = [i for i, sig in enumerate(signals) if len(sig["data"].shape) == (3 if stack else 4)]
    if key is not None:
        try:
            index = int(key)
        except ValueError:
            raise InputError(f"{path}: --dataset for {what} is the signal's index "
                             f"(0..{len(signals) - 1})") from None
        if not 0 <= index < len(signals):
            raise InputError(f"{path}: no signal {index} (the file holds {len(signals)})")
    elif len(four_d) == 1:
        index = four_d[0]
    elif not four_d:
        shapes = [tuple(sig["data"].shape) for sig in signals]
        if stack:
            raise InputError(f"{path}: {what} holds no series of frames (shapes {shapes}) to give a scan shape")
        hint = ("; a series of frames without a scan shape needs one: stemdist convert --scan-shape H W"
                if any(len(sh) == 3 for sh in shapes) else "")
        raise InputError(f"{path}: {what} holds no 4-D signal (shapes {shapes}); stemdist needs a 2-D scan "
                         f"of 2-D patterns{hint}")
    else:
        raise InputError(f"{path}: holds several 4-D signals {four_d}; choose one with --dataset INDEX")
    sig = signals[index]
    data = sig["data"]
    if stack and len(data.shape) == 3:
        arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=(64, -1, -1))
        return _native(arr), {"source_format": plugin.split(".")[-1]}
    if len(data.shape) != 4:
        raise InputError(f"{path}: signal {index} has shape {tuple(data.shape)}, "
                         "not a 2-D scan of 2-D patterns")
    arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=(8, 8, -1, -1))
    axes = list(sig.get("axes", []))  # in array order (RosettaSciIO may also say so with index_in_array)
    if axes and all(a.get("index_in_array") is not None for a in axes):
        axes.sort(key=lambda a: a["index_in_array"])
    if len(axes) != 4:
        axes = [{"size": n} for n in arr.shape]
    order = axis_order([a.get("name") for a in axes], [a.get("navigate") for a in axes])
    arr = arr.transpose(order)
    calib = {}
    for axis, i in zip(AXES, order, strict=True):
        a = axes[i]
        calib[axis] = {"name": _plain(a.get("name")), "units": _plain(a.get("units")),
                       "scale": _plain(a.get("scale", 1.0)), "offset": _plain(a.get("offset", 0.0))}
    meta = sig.get("metadata", {}) or {}
    attrs: dict[str, Any] = {"source_format": plugin.split(".")[-1], "calibration": calib,
                             "source_axes": [calib[a]["name"] for a in AXES], "source_axis_order": order}
    general = meta.get("General", {}) or {}
    keep = {k: general[k] for k in ("original_filename", "title", "date", "time", "time_zone")
            if k in general}
    if keep:
        attrs["general"] = _plain(keep)
    if "Signal" in meta:
        attrs["signal_type"] = _plain((meta["Signal"] or {}).get("signal_type"))
    if "Acquisition_instrument" in meta:
        attrs["acquisition_instrument"] = _plain(meta["Acquisition_instrument"])
    return _native(arr), attrs


def _read_zarr(path: Path, key: str | None) -> da.Array:
    from .zarr_store import open_cube  # the one way to pick a group's array

    return da.from_zarr(open_cube(path, key))


def label(source: Any) -> str:
    """How messages name an input: its path as given, or an in-memory object's description."""
    return getattr(source, "name", None) if is_object(source) else str(source)


def is_object(source: Any) -> bool:
    """An in-memory object opened by :func:`stemdist.io.objects.source` (not a path)."""
    return not isinstance(source, (str, Path))


def with_scan_shape(arr: da.Array, scan_shape: tuple[int, int], name: str) -> da.Array:
    """A series of ``H x W`` frames (``(frames, det_y, det_x)``, or 4-D with ``H x W`` positions in all) as a
    ``(H, W, det_y, det_x)`` scan, frames in raster order; any other count of frames is refused."""
    H, W = (int(v) for v in scan_shape)
    if H < 1 or W < 1:
        raise InputError(f"--scan-shape {H} {W}: both sizes must be positive")
    if arr.ndim not in (3, 4):
        raise InputError(f"{name} has shape {tuple(arr.shape)}: --scan-shape needs a series of 2-D frames")
    frames = int(np.prod(arr.shape[:-2]))
    if H * W != frames:
        raise InputError(f"{name}: --scan-shape {H} {W} makes {H * W} positions, but it holds {frames} frames "
                         f"(shape {tuple(arr.shape)}); H x W must equal the frame count")
    return arr.reshape(frames, *arr.shape[-2:]).reshape(H, W, *arr.shape[-2:])


def open_source(path: Any, dataset: str | None = None, scan_shape: tuple[int, int] | None = None
                ) -> tuple[da.Array, dict[str, Any]]:
    """Open ``path`` read-only as a lazy dask array (any supported format, or an opened in-memory object);
    ``scan_shape`` ``(H, W)`` turns a series of frames into a scan (:func:`with_scan_shape`)."""
    if is_object(path):
        return path.array, {"source": path.name, "axes": AXES, **path.attrs}
    arr, attrs = _open_path(Path(path), dataset, scan_shape is not None)
    if scan_shape is not None:
        arr = with_scan_shape(arr, scan_shape, str(path))
        attrs["scan_shape_given"] = [int(v) for v in scan_shape]
    return arr, attrs


def _open_path(path: Path, dataset: str | None, stack: bool) -> tuple[da.Array, dict[str, Any]]:
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    extra: dict[str, Any] = {}
    if suffix == ".npy":
        arr = _read_npy(path)
    elif suffix == ".npz":
        arr = _read_npz(path, dataset)
    elif suffix in RSCIIO_READERS:
        plugin, what = RSCIIO_READERS[suffix]
        arr, extra = _read_rsciio(path, dataset, plugin, what, stack)
    elif suffix in HDF5_SUFFIXES:
        arr, extra = _read_hdf5(path, dataset)
    elif suffix == ".zarr" or (path / "zarr.json").exists():
        arr = _read_zarr(path, dataset)
    else:
        raise InputError(f"{path}: unsupported input format {suffix!r} (supported: .npy, .npz, "
                         ".h5/.hdf5/.emd (incl. py4DSTEM), .zarr; with the formats extra also Merlin .mib, "
                         "NanoMegas .blo, EMPAD .xml, HyperSpy .hspy/.zspy)")
    attrs = {"source": str(path.resolve()), "source_dataset": dataset, "axes": AXES, **extra}
    return arr, attrs
