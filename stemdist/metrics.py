"""Quality metrics against a known truth, computed out of core (dask, chunk by chunk)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr


def _lazy(arr: zarr.Array | da.Array | np.ndarray) -> da.Array:
    if isinstance(arr, da.Array):
        return arr
    if isinstance(arr, zarr.Array):
        return da.from_zarr(arr)
    return da.from_array(np.asarray(arr))


def relative_rmse(estimate, truth) -> float:
    """``||estimate - truth|| / ||truth||`` over the whole cube."""
    e, t = _lazy(estimate).astype(np.float64), _lazy(truth).astype(np.float64)
    num, den = da.compute(((e - t) ** 2).sum(), (t**2).sum())
    return float(np.sqrt(num / den))
