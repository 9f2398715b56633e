"""Readers that open a 4D-STEM source lazily as a dask array, whatever its file format.

Every reader returns ``(array, attrs)``: a dask array shaped ``(scan_y, scan_x, det_y, det_x)`` that
reads the file on demand, and attributes worth recording (source, axes, calibrations).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .errors import InputError

AXES = ["scan_y", "scan_x", "det_y", "det_x"]


def _npy_header(fp) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(fp)
    shape, fortran, dtype = np.lib.format._read_array_header(fp, version)  # noqa: SLF001
    return shape, dtype, fortran


def _read_npy(path: Path) -> da.Array:
    try:
        data = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    return da.from_array(data, chunks=data.shape if data.ndim != 4 else (8, 8, -1, -1))


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


def _read_hdf5(path: Path, key: str | None) -> da.Array:
    import h5py

    f = h5py.File(path, "r")  # kept open for the lifetime of the dask graph
    if key is None:
        four_d = [n for n in _h5_datasets(f) if f[n].ndim == 4]
        if len(four_d) != 1:
            raise InputError(f"{path}: found 4-D datasets {four_d}; choose one with --dataset KEY")
        key = four_d[0]
    if key not in f:
        raise InputError(f"{path}: no dataset {key!r} (it holds {_h5_datasets(f)})")
    dset = f[key]
    chunks = (8, 8, -1, -1) if dset.ndim == 4 else dset.shape
    return da.from_array(dset, chunks=chunks)


def _read_zarr(path: Path, key: str | None) -> da.Array:
    import zarr

    node = zarr.open(store=str(path), mode="r")
    if isinstance(node, zarr.Group):
        arrays = [name for name, a in node.arrays() if a.ndim == 4]
        if key is None:
            if len(arrays) != 1:
                raise InputError(f"{path}: a Zarr group with 4-D arrays {arrays}; choose one with --dataset KEY")
            key = arrays[0]
        if key not in node:
            raise InputError(f"{path}: no array {key!r} in this Zarr group (it holds {arrays})")
        node = node[key]
    return da.from_zarr(node)


def open_source(path: str | Path, dataset: str | None = None) -> tuple[da.Array, dict[str, Any]]:
    """Open ``path`` read-only as a lazy dask array (any supported format)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = _read_npy(path)
    elif suffix == ".npz":
        arr = _read_npz(path, dataset)
    elif suffix in (".h5", ".hdf5", ".hdf", ".emd", ".nxs"):
        arr = _read_hdf5(path, dataset)
    elif suffix == ".zarr" or (path / "zarr.json").exists():
        arr = _read_zarr(path, dataset)
    else:
        raise InputError(f"{path}: unsupported input format {suffix!r} (supported: .npy, .npz, .h5/.hdf5/.emd, "
                         ".zarr)")
    attrs = {"source": str(path.resolve()), "source_dataset": dataset, "axes": AXES}
    return arr, attrs
