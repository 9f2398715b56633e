"""Conversion into chunked Zarr: every built-in input format, dtypes, chunks, codec and attributes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr

from stemdist.errors import InputError
from stemdist.io.convert import convert
from stemdist.io.zarr_store import ChunkReader, create_cube, open_cube


@pytest.fixture()
def counts():
    return np.random.default_rng(3).poisson(2.0, (7, 6, 10, 9)).astype(np.uint16)


def write(tmp_path, kind, data):
    if kind == "npy":
        np.save(tmp_path / "in.npy", data)
        return tmp_path / "in.npy", None
    if kind == "npz-stored":
        np.savez(tmp_path / "in.npz", cube=data, other=np.zeros(3))
        return tmp_path / "in.npz", "cube"
    if kind == "npz-compressed":
        np.savez_compressed(tmp_path / "in.npz", cube=data)
        return tmp_path / "in.npz", None
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("entry/data", data=data, chunks=(2, 2, 10, 9))
        f["entry/mask"] = np.ones((10, 9))
    return tmp_path / "in.h5", "entry/data"


@pytest.mark.parametrize("kind", ["npy", "npz-stored", "npz-compressed", "h5"])
def test_convert_keeps_values_dtype_and_records_source(tmp_path, counts, kind):
    src, key = write(tmp_path, kind, counts)
    before = src.read_bytes()
    out = convert(src, tmp_path / "out.zarr", dataset=key, tile=4)
    assert out.dtype == np.uint16  # integer counts stay integer
    assert out.chunks == (4, 4, 10, 9)  # whole patterns per chunk, tiled over the scan
    np.testing.assert_array_equal(out[...], counts)
    assert out.attrs["source"].endswith(src.name) and out.attrs["shape"] == [7, 6, 10, 9]
    assert out.attrs["axes"] == ["scan_y", "scan_x", "det_y", "det_x"]
    assert src.read_bytes() == before


def test_default_chunks_are_a_few_mb(tmp_path):
    data = np.zeros((40, 30, 64, 64), dtype=np.uint16)
    np.save(tmp_path / "z.npy", data)
    out = convert(tmp_path / "z.npy", tmp_path / "z.zarr")
    chunk_mb = np.prod(out.chunks) * 2 / 2**20
    assert out.chunks[2:] == (64, 64) and 1 <= chunk_mb <= 4
    codec = out.metadata.to_dict()["codecs"][-1]
    assert codec["name"] == "blosc" and codec["configuration"]["cname"] == "lz4"


def test_npz_with_several_arrays_needs_a_key(tmp_path, counts):
    np.savez(tmp_path / "two.npz", a=counts, b=counts)
    with pytest.raises(InputError, match="choose one with --dataset"):
        convert(tmp_path / "two.npz", tmp_path / "o.zarr")


def test_existing_output_is_never_overwritten(tmp_path, counts):
    np.save(tmp_path / "in.npy", counts)
    (tmp_path / "o.zarr").mkdir()
    (tmp_path / "o.zarr" / "keep").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        convert(tmp_path / "in.npy", tmp_path / "o.zarr")
    assert (tmp_path / "o.zarr" / "keep").read_text() == "x"


def test_zarr_group_input_picks_the_noisy_array(small_cube):
    arr = open_cube(small_cube)
    assert arr.path.endswith("noisy") and isinstance(arr, zarr.Array)


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float32", "float64", ">u2"])
def test_chunk_reader_decodes_like_zarr_edges_and_missing_chunks_included(tmp_path, dtype):
    shape, tile = (7, 10, 3, 4), 3
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, shape).astype(dtype)
    data[3:6, 3:6] = 0  # an all-zero chunk: Zarr leaves its file out
    if dtype == ">u2":  # big-endian: not stored with codec's layout, read through Zarr
        arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=shape, chunks=(tile, tile, 3, 4), dtype=dtype)
    else:
        arr = create_cube(tmp_path / "a.zarr", None, shape, tile, dtype)
    arr[...] = data
    direct = ChunkReader(arr, (tile, tile, 3, 4))
    assert (direct.root is not None) == (dtype != ">u2")
    via_zarr = ChunkReader(arr, (tile, tile, 3, 4))
    via_zarr.root = None
    for cy in range(3):
        for cx in range(4):
            a = direct.read(cy, cx, np.full((tile, tile, 3, 4), 99, direct.dtype))
            b = via_zarr.read(cy, cx, np.full((tile, tile, 3, 4), 99, direct.dtype))
            h, w = min(tile, 7 - cy * tile), min(tile, 10 - cx * tile)
            expected = data[cy * tile:cy * tile + h, cx * tile:cx * tile + w]
            np.testing.assert_array_equal(a[:h, :w], expected)
            np.testing.assert_array_equal(b[:h, :w], expected)
    # a grid that does not match the array's chunks is read through Zarr
    assert ChunkReader(arr, (2, 2, 3, 4)).root is None


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_chunk_writer_writes_what_zarr_reads(tmp_path, dtype):
    """Direct chunk writes (edge chunks included, their padding junk replaced by the fill value) read back
    through Zarr as written; an array the direct path cannot serve is written through Zarr."""
    from stemdist.io.zarr_store import ChunkWriter

    shape, tile = (7, 5, 3, 4), 3
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, shape).astype(dtype)
    for arr in (create_cube(tmp_path / "direct.zarr", None, shape, tile, dtype),
                zarr.create_array(str(tmp_path / "plain.zarr"), shape=shape, chunks=(tile, tile, 3, 4), dtype=dtype,
                                  compressors=None)):
        writer = ChunkWriter(arr)
        assert (writer.root is None) == ("plain" in str(arr.store.root))
        for cy in range(3):
            for cx in range(2):
                chunk = np.full((tile, tile, 3, 4), 77, dtype)  # junk where the chunk passes the scan's edge
                part = data[cy * tile:(cy + 1) * tile, cx * tile:(cx + 1) * tile]
                chunk[:part.shape[0], :part.shape[1]] = part
                writer.write(cy, cx, chunk)
        np.testing.assert_array_equal(arr[...], data)
    assert not list((tmp_path / "direct.zarr").rglob("*.partial"))
