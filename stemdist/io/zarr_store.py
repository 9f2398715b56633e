"""Chunked Zarr cubes: the codec, opening and creating cubes, and the fast chunk reader."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from ..config import CHUNK_BYTES
from ..errors import InputError
from .checks import check_dtype, check_shape


def codec(dtype: np.dtype) -> BloscCodec:
    """Lossless codecs chosen for the loader, which decodes every chunk every epoch (one thread, 16 x 16 x
    64 x 64 chunks, SrTiO3 counts at doses 100 / 500):

    - integer counts: lz4 with byte-shuffle, ratio 26 / 14 in 0.48 / 0.43 ms (zstd level 3 with
      bit-shuffle packs 76 / 31 but takes 1.8 / 1.4 ms: the loader's largest cost);
    - floats (denoised cubes hardly compress): lz4 level 1 with byte-shuffle; on a 8 x 8 x 256 x 256 chunk
      of network-like output it packs as well as level 5 (1.29), compresses 1.7x and decompresses 2.6x
      faster (3.3 and 6.2 GB/s on one thread): writing the cycle's cube is the inference pass's largest
      host cost, and the next cycle decodes it every epoch.
    """
    dtype = np.dtype(dtype)
    level = 1 if dtype.kind == "f" else 5
    return BloscCodec(cname="lz4", clevel=level, shuffle=BloscShuffle.shuffle, typesize=dtype.itemsize)


def _chunk_files(arr: zarr.Array, chunk_shape: tuple[int, ...]) -> Path | None:
    """Where ``arr``'s chunk files lie, if its chunks can be read and written as plain Blosc frames: a local
    Zarr v3 array whose chunks are ``chunk_shape``, little-endian bytes then Blosc (what ``convert`` and
    every run write). ``None`` for anything else."""
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    if (meta.zarr_format != 3 or not isinstance(arr.store, LocalStore) or tuple(arr.chunks) != tuple(chunk_shape)
            or np.dtype(arr.dtype).byteorder == ">" or len(meta.codecs) != 2):
        return None
    bytes_codec, blosc = meta.codecs
    if not isinstance(bytes_codec, BytesCodec) or not isinstance(blosc, BloscCodec):
        return None
    if np.dtype(arr.dtype).itemsize > 1 and getattr(bytes_codec.endian, "value", bytes_codec.endian) != "little":
        return None
    return Path(arr.store.root) / arr.path


class ChunkWriter:
    """Whole scan chunks ``(cy, cx)`` of a cube written straight to their chunk files (compressed in the
    calling thread, outside the GIL; each file replaced atomically), where :func:`_chunk_files` allows;
    through Zarr otherwise. The mirror of :class:`ChunkReader`: two to three times Zarr's rate per thread."""

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.chunk_shape = tuple(arr.chunks)
        self.root = _chunk_files(arr, self.chunk_shape)
        if self.root is not None:
            blosc = arr.metadata.codecs[1]
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[getattr(blosc.shuffle, "value", blosc.shuffle)]
            self.params = (getattr(blosc.cname, "value", blosc.cname).encode(), blosc.clevel, shuffle,
                           blosc.blocksize)

    def write(self, cy: int, cx: int, chunk: np.ndarray) -> None:
        """Chunk ``(cy, cx)`` from ``chunk``, of the full chunk shape (an edge chunk's valid part top-left; the
        rest is set to the fill value here, as Zarr does)."""
        index = (cy, cx) + (0,) * (len(self.chunk_shape) - 2)
        valid = tuple(min(c, n - i * c) for i, c, n in zip(index, self.chunk_shape, self.arr.shape, strict=True))
        if self.root is None:
            sl = tuple(slice(i * c, i * c + v) for i, c, v in zip(index, self.chunk_shape, valid, strict=True))
            self.arr[sl] = chunk[tuple(slice(0, v) for v in valid)]
            return
        from numcodecs import blosc

        if valid != self.chunk_shape:
            chunk[valid[0]:] = self.arr.fill_value
            chunk[:, valid[1]:] = self.arr.fill_value
        data = blosc.compress(np.ascontiguousarray(chunk, dtype=self.arr.dtype), *self.params)
        path = self.root / self.arr.metadata.encode_chunk_key(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(data)
        tmp.replace(path)


class ChunkReader:
    """Whole scan chunks ``(cy, cx)`` of a cube, decoded into a caller's buffer of ``chunk_shape``.

    A local, Blosc-compressed Zarr v3 array whose chunks are exactly ``chunk_shape`` (what ``convert``
    and every run write) is decoded straight from its chunk file into the buffer: no pass through
    Zarr's event loop, no intermediate array, no copy. Anything else is read through Zarr.
    """

    def __init__(self, arr: zarr.Array, chunk_shape: tuple[int, ...]):
        self.arr, self.chunk_shape, self.dtype = arr, tuple(chunk_shape), np.dtype(arr.dtype)
        self.root = _chunk_files(arr, self.chunk_shape)

    def read(self, cy: int, cx: int, out: np.ndarray) -> np.ndarray:
        """Chunk ``(cy, cx)`` into ``out`` (``chunk_shape``, this array's dtype; edge chunks padded)."""
        index = (cy, cx) + (0,) * (len(self.chunk_shape) - 2)
        if self.root is not None:
            try:
                data = (self.root / self.arr.metadata.encode_chunk_key(index)).read_bytes()
            except FileNotFoundError:  # never written: Zarr's fill value
                out[...] = self.arr.fill_value
                return out
            from numcodecs import blosc

            blosc.decompress(data, out)
            return out
        sl = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunk_shape, self.arr.shape,
                                                                         strict=False))
        valid = tuple(slice(0, s.stop - s.start) for s in sl)
        out[valid] = self.arr[sl]
        return out


MIN_TILE = 4  # a tile reads a one-position halo: (t + 2)² / t² patterns per pattern, 2.25x at 4, 9x at 1


def default_tile(shape: tuple[int, ...], itemsize: int = 4, target_bytes: int = CHUNK_BYTES) -> int:
    """Scan tile edge (``data.tile: null``) so that one ``(tile, tile, P, Q)`` chunk of ``itemsize``-byte
    values holds about ``target_bytes`` as stored, but at least ``MIN_TILE``: large detectors (256², a 4D
    Camera's 576²) get larger chunks rather than tiles whose halo outweighs them."""
    pattern = shape[2] * shape[3] * itemsize
    tile = max(MIN_TILE, int(math.sqrt(target_bytes / pattern)))
    return min(tile, max(shape[0], shape[1]))


def open_cube(path: str | Path, dataset: str | None = None) -> zarr.Array:
    """Open a Zarr cube read-only (a Zarr array, or ``dataset`` inside a Zarr group); check its shape."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a zarr store"
        raise InputError(f"{path}: not a Zarr store ({exc})") from None
    if isinstance(node, zarr.Group):
        arrays = sorted(name for name, a in node.arrays() if a.ndim == 4)
        if dataset is None:
            preferred = [n for n in ("noisy", "raw", "data") if n in arrays]
            if len(arrays) == 1 or preferred:
                dataset = arrays[0] if len(arrays) == 1 else preferred[0]
            else:
                raise InputError(f"{path}: a Zarr group holding {arrays}; choose one with --dataset KEY")
        if dataset not in node:
            raise InputError(f"{path}: no array {dataset!r} in this Zarr group (4-D arrays: {arrays})")
        node = node[dataset]
    check_shape(node.shape, str(path))
    check_dtype(node.dtype, str(path))
    return node


def is_zarr(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zarray").exists()
                              or (path / ".zgroup").exists())


def create_cube(parent: zarr.Group | str | Path, name: str | None, shape: tuple[int, ...], tile: int | tuple[int, int],
                dtype: Any = "float32", attrs: dict | None = None, overwrite: bool = False) -> zarr.Array:
    """A Zarr array chunked ``(ty, tx, P, Q)`` (``tile`` = ``ty = tx`` or ``(ty, tx)``) with the counts codec."""
    ty, tx = (tile, tile) if isinstance(tile, int) else tile
    chunks = (min(ty, shape[0]), min(tx, shape[1]), shape[2], shape[3])
    kwargs = dict(shape=shape, chunks=chunks, dtype=dtype, compressors=[codec(dtype)],
                  attributes=attrs or {}, overwrite=overwrite, fill_value=0)
    if name is None:
        return zarr.create_array(store=str(parent), **kwargs)
    group = parent if isinstance(parent, zarr.Group) else zarr.open_group(str(parent), mode="a")
    return group.create_array(name=name, **kwargs)
