"""The in-memory objects microscopists hold, in and out of a run: numpy and dask arrays, HyperSpy signals
(pyxem's diffraction signals are subclasses) and py4DSTEM DataCubes.

:func:`source` reads an object as a lazy ``(scan_y, scan_x, det_y, det_x)`` dask array (nothing is copied
or loaded whole, the object is never modified) with its calibrations, and a ``rebuild`` that turns the
run's refined Zarr array back into the same kind of object: axes, calibrations and metadata kept, lazy
over the run's Zarr where the input was lazy (a dask array, a lazy signal), in memory where it was.

Only numpy and dask are imported here; HyperSpy and py4DSTEM objects are recognised by their classes'
modules, so neither package is needed unless the user holds one of their objects.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from ..errors import InputError

CHUNKS = (8, 8, -1, -1)  # how an in-memory array is cut while it is streamed into the run's Zarr cube


@dataclass
class Source:
    """An object opened for a run: its data, what to record about it, and how to give the result back."""

    array: da.Array  # (scan_y, scan_x, det_y, det_x)
    name: str  # how messages name it
    rebuild: Callable[[Any], Any]  # refined array (Zarr, dask or numpy) -> an object of the input's kind
    attrs: dict[str, Any] = field(default_factory=dict)


def _package(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def _four_d(shape: tuple[int, ...], name: str) -> None:
    if len(shape) != 4:
        raise InputError(f"{name} has shape {tuple(shape)}: stemdist needs a 2-D scan of 2-D patterns "
                         "(scan_y, scan_x, det_y, det_x)")


def _lazy(final: Any) -> da.Array:
    return final if isinstance(final, da.Array) else da.from_array(final, chunks=getattr(final, "chunks", "auto"))


def _loaded(final: Any) -> np.ndarray:
    return final.compute() if isinstance(final, da.Array) else np.asarray(final[...])


def _from_numpy(arr: np.ndarray) -> Source:
    name = f"numpy array {arr.shape} {arr.dtype}"
    _four_d(arr.shape, name)
    return Source(da.from_array(arr, chunks=CHUNKS), name, _loaded, {"source_type": "numpy"})


def _from_dask(arr: da.Array) -> Source:
    name = f"dask array {arr.shape} {arr.dtype}"
    _four_d(arr.shape, name)
    return Source(arr, name, _lazy, {"source_type": "dask"})


def _hyperspy_calibration(signal: Any) -> dict[str, dict[str, Any]]:
    """Per axis in array order (scan_y, scan_x, det_y, det_x): name, units, scale, offset."""
    am = signal.axes_manager
    axes = list(am.navigation_axes[::-1]) + list(am.signal_axes[::-1])  # HyperSpy's axes, reversed, are array order
    keys = ("scan_y", "scan_x", "det_y", "det_x")
    return {k: {"name": str(a.name), "units": None if a.units in (None, "<undefined>") else str(a.units),
                "scale": float(getattr(a, "scale", 1.0)), "offset": float(getattr(a, "offset", 0.0))}
            for k, a in zip(keys, axes, strict=True)}


def _from_hyperspy(signal: Any) -> Source:
    am = signal.axes_manager
    title = signal.metadata.get_item("General.title", "") or type(signal).__name__
    name = f"{type(signal).__name__} {title!r}"
    if am.navigation_dimension != 2 or am.signal_dimension != 2:
        raise InputError(f"{name} has {am.navigation_dimension} navigation and {am.signal_dimension} signal "
                         "dimensions: stemdist needs a 2-D scan of 2-D patterns (a 4-D Signal2D)")
    lazy = bool(getattr(signal, "_lazy", False))
    data = signal.data
    array = data if isinstance(data, da.Array) else da.from_array(data, chunks=CHUNKS)
    _four_d(array.shape, name)

    def rebuild(final: Any) -> Any:
        out = signal._deepcopy_with_new_data(_lazy(final) if lazy else _loaded(final))
        if lazy and not getattr(out, "_lazy", False):
            out = out.as_lazy()
        out.metadata.set_item("General.title", f"{title} (stemdist)")
        return out

    attrs = {"source_type": f"{type(signal).__module__}.{type(signal).__name__}", "lazy": lazy,
             "calibration": _hyperspy_calibration(signal)}
    return Source(array, name, rebuild, attrs)


def _py4dstem_calibration(cube: Any) -> dict[str, dict[str, Any]]:
    cal = cube.calibration
    scan = {"units": cal.get_R_pixel_units(), "scale": float(cal.get_R_pixel_size()), "offset": 0.0}
    det = {"units": cal.get_Q_pixel_units(), "scale": float(cal.get_Q_pixel_size()), "offset": 0.0}
    return {"scan_y": {"name": "Rx", **scan}, "scan_x": {"name": "Ry", **scan},
            "det_y": {"name": "Qx", **det}, "det_x": {"name": "Qy", **det}}


def _from_py4dstem(cube: Any) -> Source:
    name = f"py4DSTEM DataCube {getattr(cube, 'name', '')!r}"
    data = cube.data
    _four_d(np.shape(data), name)
    array = data if isinstance(data, da.Array) else da.from_array(data, chunks=CHUNKS)

    def rebuild(final: Any) -> Any:
        # the calibration (pixel sizes, units, origin, ellipse, rotation) copied, not shared
        return type(cube)(data=_loaded(final), name=f"{cube.name}_stemdist",
                          calibration=copy.deepcopy(cube.calibration))

    return Source(array, name, rebuild, {"source_type": "py4DSTEM.DataCube",
                                         "calibration": _py4dstem_calibration(cube)})


def source(obj: Any) -> Source:
    """Open an in-memory object for a run (see the module's docstring); anything else is refused by name."""
    if isinstance(obj, da.Array):
        return _from_dask(obj)
    if isinstance(obj, np.ndarray):
        return _from_numpy(obj)
    if _package(obj) == "py4DSTEM" and type(obj).__name__ == "DataCube":
        return _from_py4dstem(obj)
    if hasattr(obj, "axes_manager") and hasattr(obj, "_deepcopy_with_new_data"):
        return _from_hyperspy(obj)
    raise InputError(f"stemdist cannot denoise a {type(obj).__module__}.{type(obj).__name__}: give a file path, "
                     "a numpy or dask array, a HyperSpy Signal2D or a py4DSTEM DataCube")
