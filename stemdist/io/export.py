"""Write a Zarr cube (or a run's denoised cube) back out for other tools, chunk by chunk.

- ``.npy``: a plain NumPy array (memory-mapped while written).
- ``.h5`` / ``.hdf5`` / ``.emd``: an EMD 1.0 file written with ``emdfile`` (py4DSTEM's file layer) that
  ``py4DSTEM.read`` opens as a ``DataCube`` with its calibration.
- ``.hspy``: a HyperSpy file written with RosettaSciIO that ``hs.load(path, lazy=True)`` opens as a lazy
  4-D ``Signal2D`` with its axes calibrated.
- ``.zspy``: refused with an explanation (RosettaSciIO's zspy writer needs zarr<3).

Calibrations come from the cube's attributes (set by ``stemdist convert``); for a run's denoised cube
they come from the run's input cube.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ..console import dask_bar
from ..errors import InputError
from ..layout import DENOISED, FINAL, RunPaths, is_run_dir, require_complete
from .formats import AXES, FORMATS_EXTRA, require
from .zarr_store import open_cube

EXPORT_SUFFIXES = (".npy", ".h5", ".hdf5", ".emd", ".hspy", ".zspy")
EMD_SUFFIXES = (".h5", ".hdf5", ".emd")


def resolve(source: str | Path, dataset: str | None) -> tuple[Path, str | None, Path | None]:
    """A run directory stands for its final denoised cube; returns (zarr path, dataset, run dir)."""
    source = Path(source)
    if is_run_dir(source):
        return RunPaths(source).denoised, dataset or FINAL, source
    if source.name == DENOISED and is_run_dir(source.parent):
        return source, dataset or FINAL, source.parent
    return source, dataset, None


def calibration(arr: zarr.Array, run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Per-axis {name, units, scale, offset}: the cube's own, else the run's input cube's, else pixels."""
    calib = dict(arr.attrs.get("calibration") or {})
    if not calib and run_dir is not None:
        try:
            raw = RunPaths(run_dir).read_info().get("raw")
            if raw:
                calib = dict(zarr.open_array(raw, mode="r").attrs.get("calibration") or {})
        except Exception:  # a moved or deleted input leaves the export uncalibrated, not failed
            calib = {}
    out = {}
    for axis in AXES:
        c = calib.get(axis) or {}
        out[axis] = {"name": c.get("name") or axis, "units": c.get("units") or "pixels",
                     "scale": float(c.get("scale") if c.get("scale") is not None else 1.0),
                     "offset": float(c.get("offset") if c.get("offset") is not None else 0.0)}
    return out


def _h5_chunks(shape: tuple[int, ...], zchunks: tuple[int, ...]) -> tuple[int, ...]:
    """HDF5 chunks of whole patterns: the Zarr scan tile, shrunk to stay under ~4 MiB."""
    ty, tx = zchunks[0], zchunks[1]
    pattern = shape[2] * shape[3] * 8
    while ty * tx * pattern > 4 * 2**20 and (ty > 1 or tx > 1):
        ty, tx = max(1, ty // 2), max(1, tx // 2)
    return (ty, tx, shape[2], shape[3])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stemdist")
    except PackageNotFoundError:
        return ""


def export_emd(source: zarr.Array, output: Path, calib: dict[str, dict[str, Any]],
               name: str = "datacube") -> Path:
    """An EMD 1.0 file that py4DSTEM reads as a DataCube, written with emdfile; data streamed chunk-wise."""
    emd = require("emdfile", "writing py4DSTEM HDF5 (.h5/.emd)")
    import h5py

    shape = tuple(source.shape)
    dtype = source.dtype

    class Calibration(emd.Metadata):  # the class name tells py4DSTEM to read it as its Calibration
        pass

    class DataCube(emd.Array):  # the class name tells py4DSTEM to read it as its DataCube
        def to_h5(self, group):
            """emdfile's Array.to_h5, with the data written chunk by chunk from the Zarr cube."""
            grp = emd.Node.to_h5(self, group)
            dset = grp.create_dataset("data", shape=shape, dtype=dtype,
                                      chunks=_h5_chunks(shape, source.chunks))
            dset.attrs.create("units", self.units)
            da.store(da.from_zarr(source), dset, lock=True)
            for n in range(self.rank):
                dim = self.dims[n]
                if self._dim_is_linear(dim, self.shape[n]):
                    dim = dim[:2]
                d = grp.create_dataset(f"dim{n}", data=dim)
                d.attrs.create("name", str(self.dim_names[n]))
                d.attrs.create("units", str(self.dim_units[n]))
            return grp

    stand_in = np.broadcast_to(np.zeros((), dtype=dtype), shape)  # shape and dtype only, no memory
    r, q = calib["scan_y"], calib["det_y"]
    cube = DataCube(data=stand_in, name=name, units="counts",
                    dims=[[calib[a]["offset"], calib[a]["offset"] + calib[a]["scale"]] for a in AXES],
                    dim_names=["Rx", "Ry", "Qx", "Qy"], dim_units=[calib[a]["units"] for a in AXES])
    root = emd.Root(name=f"{name}_root")
    root.add_to_tree(cube)
    root.metadata = Calibration(name="calibration", data={
        "R_pixel_size": r["scale"], "R_pixel_units": r["units"], "Q_pixel_size": q["scale"],
        "Q_pixel_units": q["units"], "QR_flip": False, "_root_treepath": "", "_target_paths": [f"/{name}"]})
    try:
        emd.save(str(output), root, mode="w")
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    with h5py.File(output, "r") as f:  # check the layout py4DSTEM relies on
        assert f[f"{name}_root/{name}"].attrs["python_class"] == "DataCube"
    return output


def export_hspy(source: zarr.Array, output: Path, calib: dict[str, dict[str, Any]], title: str = "") -> Path:
    """A HyperSpy .hspy file (HDF5) written by RosettaSciIO from the dask array, chunk by chunk."""
    writer = require("rsciio.hspy", "writing HyperSpy .hspy").file_writer
    axes = [{"name": calib[a]["name"], "units": calib[a]["units"], "scale": calib[a]["scale"],
             "offset": calib[a]["offset"], "size": int(n), "navigate": i < 2}
            for i, (a, n) in enumerate(zip(AXES, source.shape, strict=True))]
    signal = {"data": da.from_zarr(source), "axes": axes,
              "metadata": {"General": {"title": title},
                           "Signal": {"signal_type": "", "quantity": "Counts"},
                           "_HyperSpy": {"Folding": {"unfolded": False, "signal_unfolded": False,
                                                     "original_shape": None, "original_axes_manager": None}}},
              "original_metadata": {"stemdist": {k: v for k, v in source.attrs.items()
                                                 if isinstance(v, (str, int, float, bool))}},
              # the rest of the dictionary HyperSpy's own saving passes to this writer
              "tmp_parameters": {}, "attributes": {"_lazy": True}, "learning_results": {}, "models": {},
              "package_info": {"package": "stemdist", "package_version": _version()}}
    try:
        writer(str(output), signal, chunks=_h5_chunks(tuple(source.shape), source.chunks),
               show_progressbar=False)
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return output


def export_npy(source: str | Path, output: str | Path, dataset: str | None = None) -> Path:
    """Write a Zarr cube to ``.npy`` chunk by chunk through a memory map (bounded memory)."""
    output = Path(output)
    if output.exists():
        raise InputError(f"output {output} already exists; remove it or choose another path")
    arr = open_cube(source, dataset)
    require_complete(arr, str(Path(source) / dataset) if dataset else str(source))
    partial = output.with_name(output.name + ".partial")  # renamed once whole: never a torn .npy
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=arr.dtype, shape=arr.shape)
    try:
        with dask_bar(f"export {output.name}"):
            da.store(da.from_zarr(arr), out, lock=True)
        out.flush()
        del out
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return output


def export(source: str | Path, output: str | Path, dataset: str | None = None,
           overwrite: bool = False) -> Path:
    """Write the cube in ``source`` (a Zarr cube or a run directory) to ``output``, by its suffix."""
    output = Path(output)
    existing = next(p for p in output.parents if p.exists())
    if not existing.is_dir():
        raise InputError(f"{output}: cannot write there ({existing} is not a folder)")
    suffix = output.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise InputError(f"{output}: cannot export to {suffix!r} (choose .npy, .h5/.emd for py4DSTEM, "
                         ".hspy for HyperSpy)")
    if output.exists():
        if not overwrite:
            raise InputError(f"output {output} already exists; remove it or choose another path")
        output.unlink()
    zpath, dataset, run_dir = resolve(source, dataset)
    if suffix == ".npy":
        return export_npy(zpath, output, dataset=dataset)
    if suffix == ".zspy":
        raise InputError(f"{output}: .zspy is written by RosettaSciIO's zspy plugin, which needs zarr<3, "
                         "while stemdist needs zarr 3 - they cannot share one environment. Export .hspy "
                         "instead (HyperSpy opens it lazily: hs.load(path, lazy=True)); to get .zspy, open "
                         "the .hspy in an environment with zarr 2 and save it as .zspy")
    arr = open_cube(zpath, dataset)
    require_complete(arr, str(Path(zpath) / dataset) if dataset else str(zpath))
    calib = calibration(arr, run_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    with dask_bar(f"export {output.name}"):
        if suffix in EMD_SUFFIXES:
            return export_emd(arr, output, calib)
        return export_hspy(arr, output, calib, title=Path(str(zpath)).stem + (f"/{dataset}" if dataset else ""))


__all__ = ["export", "export_emd", "export_hspy", "calibration", "resolve", "FORMATS_EXTRA"]
