"""``stemdist convert``: stream any supported input into a chunked, compressed Zarr cube."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dask.array as da
import zarr

from ..console import dask_bar
from ..errors import InputError
from ..layout import COMPLETE, mark_complete
from .checks import _flag_names, _raise_on_values, _value_checks, check_dtype, check_shape
from .formats import label, open_source
from .zarr_store import create_cube, default_tile


def convert(source: Any, output: str | Path, dataset: str | None = None, tile: int | None = None,
            overwrite: bool = False, scan_shape: tuple[int, int] | None = None) -> zarr.Array:
    """Stream any supported input (a path, or an opened in-memory object) into a chunked, compressed Zarr
    cube; validate values on the way. ``scan_shape`` ``(H, W)``: the input is a series of ``H x W`` frames."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"output {output} already exists; remove it or choose another path")
    arr, attrs = open_source(source, dataset, scan_shape)
    name = label(source)
    check_shape(arr.shape, name)
    check_dtype(arr.dtype, name)
    tile = tile or default_tile(arr.shape, arr.dtype.itemsize)
    out = create_cube(output, None, arr.shape, tile, dtype=arr.dtype, overwrite=overwrite,
                      attrs={**attrs, COMPLETE: False, "shape": list(arr.shape), "dtype": str(arr.dtype)})
    arr = arr.rechunk(out.chunks)
    checks = _value_checks(arr)
    try:
        with dask_bar(f"convert {Path(name).name if isinstance(source, (str, Path)) else name}"):
            results = da.compute(da.store(arr, out, lock=False, compute=False), *checks)
        _raise_on_values(list(results[1:]), _flag_names(arr), name)
        mark_complete(out)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise
    return zarr.open_array(str(output), mode="r")
