"""``stemdist info``: cubes, groups, input files and run directories; quick on huge stores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from stemdist.io.info import describe, sample_indices
from stemdist.io.zarr_store import create_cube

from .conftest import SHARED_DATA, run_cli


def test_info_zarr_group(small_cube):
    out = run_cli("info", str(small_cube)).stdout
    assert "array 'noisy'" in out and "array 'truth'" in out
    assert "shape   (10, 9, 12, 10)" in out
    assert "chunks  (4, 4, 12, 10)  (9 chunks)" in out
    assert "dtype   uint16" in out and "blosc-lz4" in out
    assert "on disk" in out and "ratio" in out
    assert "sampled 8 of 9 chunks" in out
    assert "dose (mean counts per pattern)" in out


def test_info_counts_match_the_data_when_every_chunk_is_read(small_cube):
    info = describe(small_cube, dataset="noisy", samples=100)["arrays"]["noisy"]
    data = zarr.open_group(str(small_cube), mode="r")["noisy"][:]
    sums = data.reshape(-1, 12 * 10).sum(axis=1)
    assert info["chunks_sampled"] == info["chunks_total"] == 9
    assert info["stats"]["patterns"] == 90
    assert info["stats"]["mean_counts_per_pattern"] == pytest.approx(sums.mean())
    assert info["stats"]["max_pixel"] == data.max()
    assert info["stats"]["zero_fraction"] == pytest.approx((data == 0).mean())
    on_disk = sum(p.stat().st_size for p in (Path(small_cube) / "noisy").rglob("*") if p.is_file())
    assert info["size_on_disk"] == on_disk
    out = run_cli("info", str(small_cube), "--dataset", "noisy", "--samples", "100").stdout
    assert "all 9 chunks" in out and "array 'truth'" not in out


def test_info_json(small_cube):
    info = json.loads(run_cli("info", str(small_cube), "--json", "--samples", "2").stdout)
    noisy = info["arrays"]["noisy"]
    assert noisy["shape"] == [10, 9, 12, 10] and noisy["chunks"] == [4, 4, 12, 10]
    assert noisy["chunks_sampled"] == 2 and noisy["chunks_total"] == 9


def test_info_is_quick_on_a_huge_store(tmp_path):
    """A 4096 x 4096 scan of 256 x 256 patterns (2 TiB uncompressed), mostly never written: info reads
    metadata and a few chunks only."""
    arr = create_cube(tmp_path / "huge.zarr", None, (4096, 4096, 256, 256), tile=16, dtype="uint16")
    arr[:16, :16] = 3  # one chunk written; the rest are the fill value
    t0 = time.perf_counter()
    out = run_cli("info", str(tmp_path / "huge.zarr"), timeout=120).stdout
    elapsed = time.perf_counter() - t0
    assert "sampled 8 of 65536 chunks" in out
    assert "shape   (4096, 4096, 256, 256)" in out and "uncompressed 2.0 TiB" in out
    assert elapsed < 60  # seconds, most of it Python start-up and imports


def test_sample_indices_spread_over_the_grid():
    picks = sample_indices((10, 10, 1, 1), 4)
    assert picks[0] == (0, 0, 0, 0) and picks[-1] == (9, 9, 0, 0) and len(picks) == 4
    assert len(sample_indices((2, 2, 1, 1), 8)) == 4


def test_info_detector_file():
    blo = SHARED_DATA / "formats" / "test1.blo"
    if not blo.exists():
        pytest.skip("shared/data/formats not present")
    from .test_formats import need_formats

    need_formats()
    out = run_cli("info", str(blo)).stdout
    assert "blockfile file" in out and "(3, 2, 144, 144)" in out and "uint8" in out
    assert "calibration  scan_y 12.8 nm" in out


def test_info_run_directory(smoke_run):
    run = smoke_run
    (run / "report").mkdir(exist_ok=True)
    if not (run / "report" / "metrics.json").exists():  # written by the report step where it exists
        (run / "report" / "metrics.json").write_text(json.dumps({"psnr": 31.5, "ssim": {"final": 0.91}}))
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    out = run_cli("info", str(run)).stdout
    assert "run directory" in out
    assert "cycles completed 2 of 2" in out
    assert "cycle_01: loss_epoch" in out and "cycle_02: loss_epoch" in out
    assert "(3 epochs)" in out
    assert "metrics (report/metrics.json)" in out and str(next(iter(metrics))) in out
    assert "final cube:" in out and "input cube:" in out
    info = json.loads(run_cli("info", str(run), "--json").stdout)
    assert info["cycles_completed"] == 2 and info["arrays"]["final"] is True
    losses = info["losses"]["cycle_01"]["loss_epoch"]
    assert losses["epochs"] == 3 and np.isfinite(losses["last"])
    assert info["final"]["shape"] == [16, 16, 16, 16]  # the smoke cube's


def test_info_errors(tmp_path):
    proc = run_cli("info", str(tmp_path / "nope.zarr"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("info", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2 and "neither a Zarr store nor a stemdist run" in proc.stderr
