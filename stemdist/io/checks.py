"""Checks of an input cube before any work: shape, dtype and values (streamed chunk by chunk)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from ..console import dask_bar
from ..errors import InputError


def check_shape(shape: tuple[int, ...], name: str) -> None:
    """A cube must be 4-D with a scan of at least 3 x 3 (every position needs 8 neighbours)."""
    if len(shape) != 4:
        hint = ("; a series of frames without a scan shape: stemdist convert --scan-shape H W"
                if len(shape) == 3 else "")
        raise InputError(f"{name}: expected a 4-D cube (scan_y, scan_x, det_y, det_x), got shape {tuple(shape)}"
                         f"{hint}")
    if shape[0] < 3 or shape[1] < 3:
        raise InputError(f"{name}: the scan must be at least 3 x 3 probe positions, got {shape[0]} x {shape[1]}")
    if shape[2] < 1 or shape[3] < 1:
        raise InputError(f"{name}: empty detector, shape {tuple(shape)}")


def check_dtype(dtype: np.dtype, name: str) -> None:
    if np.dtype(dtype).kind not in "iuf":
        raise InputError(f"{name}: counts must be integers or floats, got dtype {dtype}")


def _value_checks(arr: da.Array) -> list[da.Array]:
    """Lazy reductions that flag non-finite and negative values (skipped where the dtype rules them out)."""
    checks = []
    if arr.dtype.kind == "f":
        checks.append(~da.isfinite(arr).all())
    if arr.dtype.kind in "fi":
        checks.append((arr < 0).any())
    return checks


def _raise_on_values(flags: list[bool], kinds: list[str], name: str) -> None:
    for flag, kind in zip(flags, kinds, strict=True):
        if flag:
            raise InputError(f"{name}: contains {kind} values; counts must be finite and >= 0")


def _flag_names(arr: da.Array) -> list[str]:
    names = []
    if arr.dtype.kind == "f":
        names.append("NaN or infinite")
    if arr.dtype.kind in "fi":
        names.append("negative")
    return names


def check_values(arr: zarr.Array | da.Array, name: str, extra: tuple[da.Array, ...] = ()) -> list:
    """Stream over the cube chunk by chunk; raise if any value is NaN, infinite or negative.

    ``extra`` lazy results over the same cube are computed in the same pass and returned.
    """
    darr = arr if isinstance(arr, da.Array) else da.from_zarr(arr)
    checks = _value_checks(darr)
    with dask_bar(f"checking {Path(name).name if Path(name).exists() else name}"):
        results = list(da.compute(*checks, *extra))
    _raise_on_values(results[:len(checks)], _flag_names(darr), name)
    return results[len(checks):]


def check_chunks(arr: zarr.Array, name: str) -> None:
    """Refuse a Zarr cube with chunks that were never written: Zarr would read them as its fill value,
    which is not data. Names how many are missing and where the first ones lie on the scan."""
    total, have = arr.nchunks, arr.nchunks_initialized
    if have >= total:
        return
    ty, tx = arr.chunks[:2]
    where = []
    root = getattr(arr.store, "root", None)
    if root is not None:  # a local store: find the missing chunk files
        grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks, strict=True)]
        for index in np.ndindex(*grid):
            if not (Path(root) / arr.path / arr.metadata.encode_chunk_key(index)).exists():
                cy, cx = index[:2]
                where.append(f"scan y {cy * ty}-{min((cy + 1) * ty, arr.shape[0]) - 1}, "
                             f"x {cx * tx}-{min((cx + 1) * tx, arr.shape[1]) - 1}")
                if len(where) == 3:
                    break
    at = f" (first at {'; '.join(where)})" if where else ""
    raise InputError(f"{name}: {total - have} of {total} chunks are missing{at}; Zarr would read them as its fill "
                     f"value {arr.fill_value}, which is not data - re-export or re-convert the cube")
