"""Shared fixtures: small synthetic cubes in real Zarr stores on disk, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stemdist.io.synth import synth

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOKE = ["--config", "smoke", "--quiet"]


@pytest.fixture(scope="session")
def small_cube(tmp_path_factory) -> Path:
    """A 10 x 9 scan of 12 x 10 patterns (non-square, detector not a multiple of 4), 4 x 4 chunks."""
    path = tmp_path_factory.mktemp("data") / "small.zarr"
    synth(path, (10, 9), (12, 10), dose=200.0, seed=1, tile=4)
    return path


@pytest.fixture(scope="session")
def smoke_cube(tmp_path_factory) -> Path:
    """The demo's cube: 16 x 16 scan, 16 x 16 detector, dose 100."""
    path = tmp_path_factory.mktemp("data") / "smoke.zarr"
    synth(path, (16, 16), (16, 16), dose=100.0, seed=0, tile=8)
    return path


@pytest.fixture(scope="session")
def smoke_run(smoke_cube, tmp_path_factory) -> Path:
    """One finished `denoise` run of the smoke cube (smoke config: 2 cycles x 3 epochs), shared by every test
    that only reads a run."""
    run = tmp_path_factory.mktemp("runs") / "smoke"
    run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE)
    return run


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m stemdist ARGS`` in a real subprocess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "stemdist", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stemdist {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
