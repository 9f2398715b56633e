"""Distributed runs on CPU (gloo) in real subprocesses: torchrun, self-launch, 2 nodes, SLURM-style env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from .conftest import SMOKE

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    return {**e, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "stemdist", *args]
    return subprocess.run(cmd, env=env(), text=True, capture_output=True, timeout=600)


def assert_complete_run(run: Path, ranks: int) -> None:
    group = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    for name in ("cycle_01", "cycle_02", "final"):
        assert group[name].attrs["complete"] is True
        assert np.isfinite(group[name][...]).all()
    for f in ("unet_denoiser.pt", "config.yaml", "denoised.png", "run.json"):
        assert (run / f).exists()
    assert f"{ranks} rank(s)" in (run / "stemdist.log").read_text()


def test_torchrun_two_processes(tmp_path, smoke_cube):
    """The README's recipe: torchrun --nproc-per-node 2 -m stemdist denoise ..."""
    run = tmp_path / "run"
    check(torchrun("denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE, "--accelerator", "cpu",
                   "--set", "model.base_width=auto", "--set", "train.warmup_epochs=auto", "--epochs", "10",
                   "--set", "train.average_epochs=2", "--set", "train.holdout=0.2"))
    assert_complete_run(run, 2)
    log = (run / "stemdist.log").read_text()
    assert "7 batches of 16 per rank" in log  # 256 - 51 held-out samples over 2 ranks
    # both ranks built the same network
    assert "sized from the counts: model.base_width 24, train.warmup_epochs 4 (auto: " in log
    assert "51 probe positions held out" in log and "the networks used are those of epochs" in log
    # both ranks used the networks rank 0 saved: one process predicting cycle 2 from its input gives its cube
    den = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    out = tmp_path / "again.zarr"
    cmd = [sys.executable, "-m", "stemdist", "predict", str(run), str(run / "denoised.zarr" / "cycle_01"), str(out)]
    check(subprocess.run([*cmd, "--quiet"], env=env(), text=True, capture_output=True, timeout=600))
    np.testing.assert_allclose(zarr.open_array(str(out), mode="r")[...], den["cycle_02"][...], rtol=1e-4, atol=1e-4)


def test_devices_flag_launches_itself(tmp_path, small_cube):
    """`stemdist denoise --devices 2` starts its own 2 processes (here cross-fitting over 2 folds, each network's
    targets split over the ranks); --resume works the same way."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "stemdist", "denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE,
           "--devices", "2", "--set", "train.cycles=2", "--set", "train.crossfit=2"]
    check(subprocess.run(cmd, env=env(), text=True, capture_output=True, timeout=600))
    assert_complete_run(run, 2)
    log = (run / "stemdist.log").read_text()
    assert log.count("left out (train.crossfit 2)") == 4 and "cycle 2 member 1:" in log
    check(subprocess.run(cmd + ["--resume"], env=env(), text=True, capture_output=True, timeout=600))


def predict_with(ranks: int, run: Path, cube: Path, out: Path) -> np.ndarray:
    args = ["predict", str(run), str(cube / "noisy"), str(out), "--quiet"]
    if ranks == 1:
        check(subprocess.run([sys.executable, "-m", "stemdist", *args], env=env(), text=True,
                             capture_output=True, timeout=600))
    else:
        check(torchrun(*args, nproc=ranks))
    arr = zarr.open_array(str(out), mode="r")
    assert arr.attrs["complete"] is True
    return arr[...]


def test_inference_is_the_same_for_1_2_3_ranks(tmp_path, small_cube):
    run = tmp_path / "run"
    check(subprocess.run([sys.executable, "-m", "stemdist", "denoise", str(small_cube / "noisy"), "--out", str(run),
                          *SMOKE, "--cycles", "1", "--epochs", "1", "--set", "train.lr=1e-3"], env=env(), text=True,
                         capture_output=True, timeout=600))  # lr 1e-3: the smoke's 3e-3 diverges in 6 steps here
    outs = [predict_with(n, run, small_cube, tmp_path / f"pred{n}.zarr") for n in (1, 2, 3)]
    assert outs[0].shape == (10, 9, 12, 10)
    assert outs[0].std() > 0
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5, atol=1e-6)


def test_two_nodes_on_loopback(tmp_path, smoke_cube):
    """`--nnodes 2`, one process per node, rendezvous on 127.0.0.1, as launch/torchrun.sh does."""
    run = tmp_path / "run"
    port = str(free_port())
    procs = []
    for node in (0, 1):
        e = {**env(), "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "launch" / "torchrun.sh"), "1", str(smoke_cube / "noisy"), "--out", str(run),
             *SMOKE, "--accelerator", "cpu"],
            env={**e, "PATH": f"{Path(sys.executable).parent}:{e['PATH']}"}, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-5000:]
    assert_complete_run(run, 2)


@pytest.mark.parametrize("ranks", [2])
def test_srun_style_environment(tmp_path, smoke_cube, ranks):
    """What srun sets for each task (SLURM_PROCID, ...) is enough: no torchrun involved."""
    run = tmp_path / "run"
    port = str(free_port())
    procs = []
    for r in range(ranks):
        e = {**env(), "SLURM_NTASKS": str(ranks), "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
             "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": str(ranks),
             "SLURM_JOB_NAME": "stemdist", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stemdist", "denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE,
             "--devices", str(ranks)], env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-5000:]
    assert_complete_run(run, ranks)
