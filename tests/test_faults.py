"""Fault injection with real processes: kill -9 at every stage then --resume, concurrent runs, killed launchers
and ranks, broken inputs and short schedules. Every failure is one line and exit status 2."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from stemdist.quality.metrics import relative_rmse

from .conftest import SMOKE, run_cli

QUICK = [*SMOKE, "--cycles", "1", "--epochs", "2", "--set", "data.tile=4"]  # 3 x 3 tiles of the small cube


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stemdist: error:"), proc.stderr
    assert needle in lines[0], lines[0]


def final_of(run: Path) -> np.ndarray:
    return zarr.open_array(str(run / "denoised.zarr" / "final"), mode="r")[...]


@pytest.fixture(scope="module")
def npy_input(small_cube, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "cube.npy"
    np.save(path, zarr.open_array(str(small_cube / "noisy"), mode="r")[...])
    return path


@pytest.fixture(scope="module")
def uninterrupted(npy_input, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "whole"
    run_cli("denoise", str(npy_input), "--out", str(run), *QUICK)
    return run


@pytest.mark.parametrize("fault", ["convert", "train:1:1", "infer:2", "final:1"])
def test_kill_9_then_resume_reaches_the_uninterrupted_cube(fault, npy_input, uninterrupted, tmp_path):
    run = tmp_path / "run"
    killed = run_cli("denoise", str(npy_input), "--out", str(run), *QUICK, env={"STEMDIST_FAULT": fault},
                     check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if fault.startswith("final"):  # an incomplete cube is never passed on
        one_line_error(run_cli("export", str(run), str(tmp_path / "x.npy"), check=False), "incomplete")
        assert not (tmp_path / "x.npy").exists()
    run_cli("denoise", str(npy_input), "--out", str(run), *QUICK, "--resume")
    np.testing.assert_allclose(final_of(run), final_of(uninterrupted), rtol=1e-4, atol=1e-4)
    assert not (run / ".lock").exists()


def test_interrupted_conversion_is_redone_by_a_fresh_run(npy_input, uninterrupted, tmp_path):
    run = tmp_path / "run"
    run_cli("denoise", str(npy_input), "--out", str(run), *QUICK, env={"STEMDIST_FAULT": "convert"}, check=False)
    assert (run / "input.zarr.partial").exists() and not (run / "run.json").exists()
    run_cli("denoise", str(npy_input), "--out", str(run), *QUICK)  # not a dead end, with or without --resume
    np.testing.assert_allclose(final_of(run), final_of(uninterrupted), rtol=1e-4, atol=1e-4)


def test_torn_checkpoint_is_one_line(npy_input, tmp_path):
    run = tmp_path / "run"
    run_cli("denoise", str(npy_input), "--out", str(run), *QUICK, env={"STEMDIST_FAULT": "train:1:1"}, check=False)
    ckpt = run / "checkpoints" / "cycle_01" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    one_line_error(run_cli("denoise", str(npy_input), "--out", str(run), *QUICK, "--resume", check=False),
                   "last.ckpt is unreadable")


def test_a_second_run_in_the_same_dir_is_refused(small_cube, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "stemdist", "denoise", str(small_cube / "noisy"), "--out",
                              str(run), *SMOKE, "--epochs", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        for _ in range(300):
            if (run / "run.json").exists():
                break
            time.sleep(0.05)
        second = run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE, "--epochs", "20", "--resume",
                         check=False)
        one_line_error(second, "in use by another stemdist run")
        assert f"PID {first.pid}" in second.stderr
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not (run / ".lock").exists()
    rows = (run / "logs" / "losses.csv").read_text().splitlines()[1:]
    assert len(rows) == len({tuple(r.split(",")[:2]) for r in rows}) == 40  # no interleaved or repeated epochs


def test_a_stale_lock_is_taken_over(small_cube, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *QUICK)
    assert (run / "denoised.zarr" / "final").exists() and not (run / ".lock").exists()


def _live(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killed_launcher_leaves_no_live_rank(small_cube, tmp_path):
    run = tmp_path / "orphans"
    launcher = subprocess.Popen([sys.executable, "-m", "stemdist", "denoise", str(small_cube / "noisy"), "--out",
                                 str(run), *SMOKE, "--devices", "2", "--epochs", "30"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for _ in range(600):  # until both ranks train
        if (run / "logs" / "losses.csv").exists():
            break
        time.sleep(0.1)
    assert len(_live(str(run))) >= 3  # stemdist, torchrun, 2 ranks
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 20
    while _live(str(run)) and time.time() < deadline:
        time.sleep(0.2)
    assert _live(str(run)) == []


def test_a_dead_rank_ends_the_run_in_one_line_and_it_resumes(small_cube, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE, "--devices", "2",
                   env={"STEMDIST_FAULT": "train:1:1", "STEMDIST_FAULT_RANK": "1"}, check=False)
    one_line_error(proc, "rank 1 was killed by SIGKILL")
    run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE, "--devices", "2", "--resume")
    assert zarr.open_array(str(run / "denoised.zarr" / "final"), mode="r").attrs["complete"] is True


def test_missing_input_chunk_is_refused(small_cube, tmp_path):
    cube = tmp_path / "holey.zarr"
    shutil.copytree(small_cube / "noisy", cube)
    chunk = cube / "c" / "1" / "0" / "0" / "0"
    assert chunk.exists()
    chunk.unlink()
    proc = run_cli("denoise", str(cube), "--out", str(tmp_path / "run"), *QUICK, check=False)
    one_line_error(proc, "1 of 9 chunks are missing (first at scan y 4-7, x 0-3)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", [["--epochs", "1"], ["--epochs", "2", "--cycles", "2"]])
def test_short_schedules_give_counts(schedule, small_cube, tmp_path):
    """The default configuration (4 warm-up epochs) in a hurry: every cycle ends on the Poisson loss."""
    run = tmp_path / "run"
    run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), "--quiet", "--set", "model.base_width=8",
            "--set", "data.num_workers=0", "--accelerator", "cpu", "--batch-size", "16", *schedule)
    truth = zarr.open_array(str(small_cube / "truth"), mode="r")
    raw = zarr.open_array(str(small_cube / "noisy"), mode="r")
    assert relative_rmse(final_of(run), truth) < 0.5 * relative_rmse(raw, truth)
    assert "warm-up shortened" in (run / "stemdist.log").read_text()


def test_a_diverged_cycle_stops_the_run(small_cube, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *QUICK, "--set", "train.lr=30",
                   check=False)
    one_line_error(proc, "cycle 1 diverged")
    cycle = zarr.open_array(str(run / "denoised.zarr" / "cycle_01"), mode="r")
    assert cycle.attrs["complete"] is False and not (run / "denoised.zarr" / "final").exists()


@pytest.mark.parametrize("args,needle", [
    (["denoise", "{cube}", "--out", "/dev/null/run"], "Not a directory"),
    (["export", "{cube}", "/dev/null/x.npy"], "/dev/null is not a folder"),
    (["denoise", "{text}", "--out", "{tmp}/r"], "not a NumPy .npy file"),
])
def test_failures_are_one_line(args, needle, small_cube, tmp_path):
    text = tmp_path / "notes.npy"
    text.write_text("scan notes, not an array\n")
    fill = {"cube": str(small_cube / "noisy"), "text": str(text), "tmp": str(tmp_path)}
    one_line_error(run_cli(*[a.format(**fill) for a in args], check=False), needle)


def test_demo_reruns_cleanly(tmp_path):
    for _ in range(2):
        proc = run_cli("demo", "--out", str(tmp_path / "demo"))
        assert "relative RMSE against truth" in proc.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("not the demo's")
    one_line_error(run_cli("demo", "--out", str(tmp_path / "mine"), check=False), "owns its folder")


def test_command_line_starts_without_torch():
    """`stemdist --help` and `info` import no torch, Lightning or dask up front (they took ~10 s)."""
    code = ("import sys, stemdist.cli as c; c.build_parser(); "
            "print(sorted({'torch', 'dask', 'pytorch_lightning'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_refuses_an_incomplete_cube(npy_input, uninterrupted, tmp_path):
    run = tmp_path / "run"
    run_cli("denoise", str(npy_input), "--out", str(run), *QUICK, env={"STEMDIST_FAULT": "final:1"}, check=False)
    proc = run_cli("predict", str(uninterrupted), str(run / "denoised.zarr" / "final"), str(tmp_path / "p.zarr"),
                   check=False)
    one_line_error(proc, "incomplete")
    assert not (tmp_path / "p.zarr").exists()


def assert_resumes_to(whole: Path, npy_input: Path, run: Path, args: list[str], fault: str) -> None:
    """A run of ``args`` killed (``kill -9``) at ``fault`` and resumed ends with ``whole``'s final cube."""
    killed = run_cli("denoise", str(npy_input), "--out", str(run), *args, env={"STEMDIST_FAULT": fault}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("denoise", str(npy_input), "--out", str(run), *args, "--resume")
    np.testing.assert_allclose(final_of(run), final_of(whole), rtol=1e-4, atol=1e-4)


def test_weight_average_is_the_network_used_and_survives_kill_9(npy_input, tmp_path):
    """train.ema: the cycle's weights are Lightning's moving average (kept in the checkpoint beside the last
    step's), and a run killed mid-cycle resumes to the same cube."""
    import torch

    ema = [*SMOKE, "--cycles", "1", "--epochs", "3", "--set", "data.tile=4", "--set", "train.ema=0.7",
           "--set", "train.average_epochs=1"]
    whole = tmp_path / "whole"
    run_cli("denoise", str(npy_input), "--out", str(whole), *ema)
    ckpt = torch.load(whole / "checkpoints" / "cycle_01" / "last.ckpt", map_location="cpu", weights_only=False)
    average = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    last = {k.removeprefix("net."): v for k, v in ckpt["current_model_state"].items() if k.startswith("net.")}
    used = torch.load(whole / "weights" / "cycle_01.pt", map_location="cpu")
    assert used.keys() == average.keys() and all(torch.equal(used[k], average[k]) for k in used)
    assert not all(torch.allclose(used[k], last[k]) for k in used)  # the average, not the last step
    assert ckpt["averaging_state"]["n_averaged"].item() == ckpt["global_step"] - ckpt["global_step"] // 3
    assert_resumes_to(whole, npy_input, tmp_path / "run", ema, "train:1:1")


def test_output_average_is_the_network_used_and_survives_kill_9(npy_input, tmp_path):
    """train.average_epochs (no holdout): the cycle's cube is the mean of the outputs of its last Poisson epochs'
    networks (kept in the checkpoint), predict rebuilds the same average, and a run killed mid-cycle resumes to
    the same cube."""
    import torch

    avg = [*SMOKE, "--cycles", "1", "--epochs", "4", "--set", "data.tile=4", "--set", "train.average_epochs=2",
           "--set", "train.holdout=0"]
    whole = tmp_path / "whole"
    run_cli("denoise", str(npy_input), "--out", str(whole), *avg)
    used = torch.load(whole / "weights" / "cycle_01.pt", map_location="cpu")
    assert set(used) == {"last", "average"} and len(used["average"]) == 2
    ckpt = torch.load(whole / "checkpoints" / "cycle_01" / "last.ckpt", map_location="cpu", weights_only=False)
    last = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(used["last"][k], last[k]) for k in last)
    assert all(torch.equal(used["average"][-1][k], last[k]) for k in last)  # the last epoch's, and the one before
    assert not all(torch.equal(used["average"][0][k], last[k]) for k in last)
    cycle = zarr.open_array(str(whole / "denoised.zarr" / "cycle_01"), mode="r")[...]
    raw = json.loads((whole / "run.json").read_text())["raw"]  # the run's own Zarr copy of the input
    run_cli("predict", str(whole), raw, str(tmp_path / "again.zarr"), "--quiet")
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "again.zarr"), mode="r")[...], cycle, rtol=1e-5,
                               atol=1e-5)
    alone = tmp_path / "alone"  # the last epoch's network by itself predicts something else
    alone.mkdir()
    torch.save(used["last"], alone / "w.pt")
    shutil.copyfile(whole / "config.yaml", alone / "config.yaml")
    run_cli("predict", str(alone / "w.pt"), raw, str(tmp_path / "alone.zarr"), "--quiet")
    assert np.abs(zarr.open_array(str(tmp_path / "alone.zarr"), mode="r")[...] - cycle).max() > 1e-3
    assert_resumes_to(whole, npy_input, tmp_path / "run", avg, "train:1:2")


def test_held_out_loss_picks_the_networks_used_and_survives_kill_9(npy_input, tmp_path):
    """train.holdout: each Poisson epoch's loss on the held-out positions is logged, the networks averaged are
    those of the epochs where it was lowest (kept in the checkpoint), and a run killed mid-cycle resumes to the
    same cube."""
    import torch

    from stemdist.layout import read_losses

    args = [*SMOKE, "--cycles", "1", "--epochs", "6", "--set", "data.tile=4", "--set", "train.average_epochs=2",
            "--set", "train.holdout=0.2"]
    whole = tmp_path / "whole"
    run_cli("denoise", str(npy_input), "--out", str(whole), *args)
    rows = read_losses(whole)
    poisson = [r for r in rows if r["phase"] == "poisson"]
    assert len(poisson) == 5 and all(np.isfinite(r["heldout"]) for r in poisson)
    assert all(np.isnan(r["heldout"]) for r in rows if r["phase"] == "warmup")
    best = sorted(r["epoch"] for r in sorted(poisson, key=lambda r: r["heldout"])[:2])
    ckpt = torch.load(whole / "checkpoints" / "cycle_01" / "last.ckpt", map_location="cpu", weights_only=False)
    kept = ckpt["callbacks"]["EpochSnapshots"]
    assert kept["epochs"] == best
    np.testing.assert_allclose(kept["scores"], [r["heldout"] for r in poisson if r["epoch"] in best], rtol=1e-5)
    used = torch.load(whole / "weights" / "cycle_01.pt", map_location="cpu")
    assert all(torch.equal(u[k], m[k]) for u, m in zip(used["average"], kept["members"], strict=True) for k in u)
    log = (whole / "stemdist.log").read_text()
    assert f"the networks used are those of epochs {best[0] + 1}, {best[1] + 1} " in log
    assert_resumes_to(whole, npy_input, tmp_path / "run", args, "train:1:3")


def test_snapshots_keep_the_lowest_held_out_losses():
    """EpochSnapshots with ``select``: the ``keep`` Poisson epochs with the lowest held-out loss, in epoch order,
    whatever order they came in; without, the last ``keep``, ``every``-th epoch counted back from the last one
    (fewer when the Poisson epochs run out); warm-up epochs never."""
    from types import SimpleNamespace

    import torch

    from stemdist.train.trainer import EpochSnapshots

    net = torch.nn.Linear(1, 1)
    scores = [9.0, 3.0, 1.0, 2.0, 5.0, 0.5, 4.0]  # epoch 0 is the warm-up's
    for select, every, expected in ((True, 1, [2, 3, 5]), (True, 2, [2, 3, 5]), (False, 1, [4, 5, 6]),
                                    (False, 2, [2, 4, 6]), (False, 3, [3, 6])):
        snaps = EpochSnapshots(3, select, every)
        for epoch, score in enumerate(scores):
            with torch.no_grad():
                net.weight.fill_(epoch)
            trainer = SimpleNamespace(current_epoch=epoch, max_epochs=len(scores),
                                      callback_metrics={"heldout": torch.tensor(score)},
                                      strategy=SimpleNamespace(broadcast=lambda v: v))
            snaps.on_train_epoch_end(trainer, SimpleNamespace(in_warmup=lambda e=epoch: e == 0, net=net))
        assert snaps.epochs == expected
        assert [float(m["weight"]) for m in snaps.members] == expected
        restored = EpochSnapshots(3, select, every)
        restored.load_state_dict(snaps.state_dict())
        assert restored.epochs == expected and restored.scores == snaps.scores


def test_average_every_spaces_the_networks_by_optimiser_steps():
    """train.average_every (default 1: consecutive epochs); auto: the averaged networks at least AVERAGE_STEPS
    optimiser steps apart (an epoch of a small scan is a few dozen steps), every epoch's once an epoch is that
    long, all of them within the Poisson phase; a number given is kept within that phase too."""
    from stemdist.config import load, resolve_auto
    from stemdist.train.trainer import AVERAGE_STEPS, average_every

    train = resolve_auto(load("default"), 100)[0].train  # 4 warm-up epochs, 4 networks averaged
    at = lambda epochs, **kw: train.model_copy(update={"epochs": epochs, "average_every": "auto", **kw})  # noqa: E731
    assert train.average_every == 1 and average_every(train.model_copy(update={"epochs": 59}), 32) == 1
    assert average_every(at(59), 32) == AVERAGE_STEPS // 32 == 4  # a 32 x 32 scan in batches of 32
    assert average_every(at(59), AVERAGE_STEPS) == average_every(at(15), 2048) == 1  # a 256 x 256 scan
    assert average_every(at(59), 1) == (59 - 4) // 4  # all four within the Poisson epochs
    assert average_every(at(16), 32) == 3 and average_every(at(8), 32) == 1
    assert average_every(at(59, average_every=2), 1) == 2 and average_every(at(16, average_every=9), 1) == 3


def assert_predict_rebuilds(run: Path, out: Path, cycles: int = 1) -> None:
    """``predict`` with the run's saved weights (its last cycle's) on that cycle's input reproduces that cycle's
    cube: the raw counts for one cycle, else the cycle before's cube (the last cycle blends with beta 1)."""
    cycle = zarr.open_array(str(run / "denoised.zarr" / f"cycle_{cycles:02d}"), mode="r")[...]
    source = (json.loads((run / "run.json").read_text())["raw"] if cycles == 1
              else str(run / "denoised.zarr" / f"cycle_{cycles - 1:02d}"))
    run_cli("predict", str(run), source, str(out), "--quiet")
    np.testing.assert_allclose(zarr.open_array(str(out), mode="r")[...], cycle, rtol=1e-5, atol=1e-5)


def test_crossfit_predicts_each_position_by_the_network_never_trained_on_it(npy_input, tmp_path):
    """train.crossfit 2: network k never has fold k's positions as targets (its log counts them), each position of
    the cycle's cube is the output of its own fold's networks alone (rebuilt here from the saved weights, the two
    folds' outputs differing), predict on a cube averages every network, and a run killed inside the second
    network resumes to the same cube."""
    import torch

    from stemdist.config import load
    from stemdist.data.tiles import fold_of
    from stemdist.io.zarr_store import create_cube
    from stemdist.run.inference import infer
    from stemdist.train.module import Denoiser, OutputAverage, averaged

    args = [*SMOKE, "--cycles", "1", "--epochs", "3", "--set", "data.tile=4", "--set", "train.average_epochs=2",
            "--set", "train.crossfit=2"]
    whole = tmp_path / "whole"
    run_cli("denoise", str(npy_input), "--out", str(whole), *args)
    raw_path = json.loads((whole / "run.json").read_text())["raw"]
    raw = zarr.open_array(raw_path, mode="r")
    H, W = raw.shape[:2]
    folds = fold_of(np.arange(H * W), 2, 0).reshape(H, W)
    assert 0 < (folds == 0).sum() < H * W
    log = (whole / "stemdist.log").read_text()
    for k in (0, 1):
        assert f"{(folds == k).sum()} probe positions of fold {k} left out (train.crossfit 2)" in log
        assert f"{(folds != k).sum()} samples per epoch" in log
        assert f"on fold {k} (never its targets)" in log
    scored = [r for r in csv.DictReader((whole / "logs" / "losses.csv").open()) if r["phase"] == "poisson"]
    assert {r["member"] for r in scored} == {"0", "1"}
    assert all(math.isfinite(float(r["heldout"])) for r in scored)  # each network's loss on its own left-out fold
    state = torch.load(whole / "weights" / "cycle_01.pt", map_location="cpu")
    assert state["folds"] == 2 and len(state["average"]) == 4 and len(state["lasts"]) == 2
    config = load(whole / "config.yaml")
    cube = zarr.open_array(str(whole / "denoised.zarr" / "cycle_01"), mode="r")[...]
    by_fold = []
    for k in (0, 1):
        out = create_cube(str(tmp_path / f"fold{k}.zarr"), None, tuple(raw.shape), (4, 4))
        model = averaged(Denoiser(config.model, config.train), state["average"][2 * k:2 * k + 2])
        assert isinstance(model, OutputAverage)
        infer(model, raw, None, 0.0, out, borders=config.data.borders, batch_size=16, device=torch.device("cpu"))
        by_fold.append(zarr.open_array(str(tmp_path / f"fold{k}.zarr"), mode="r")[...])
        np.testing.assert_allclose(cube[folds == k], by_fold[k][folds == k], rtol=1e-5, atol=1e-5)
    assert np.abs(by_fold[0] - by_fold[1]).max() > 1e-3
    run_cli("predict", str(whole), raw_path, str(tmp_path / "all.zarr"), "--quiet")
    everyone = averaged(Denoiser(config.model, config.train), state["average"])
    out = create_cube(str(tmp_path / "mean.zarr"), None, tuple(raw.shape), (4, 4))
    infer(everyone, raw, None, 0.0, out, borders=config.data.borders, batch_size=16, device=torch.device("cpu"))
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "all.zarr"), mode="r")[...],
                               zarr.open_array(str(tmp_path / "mean.zarr"), mode="r")[...], rtol=1e-5, atol=1e-5)
    assert_resumes_to(whole, npy_input, tmp_path / "run", args, "train:1:1:member1")

def test_augmented_training_is_used_and_survives_kill_9(npy_input, tmp_path):
    """train.augment: joint moves the batches (the run differs from the same run without it), the averaged
    networks each see another move at inference and predict rebuilds them, and each step's move depends on the
    step alone, so a run killed mid-cycle resumes to the same cube."""
    import yaml

    args = [*SMOKE, "--cycles", "1", "--epochs", "4", "--set", "data.tile=4", "--set", "train.average_epochs=2"]
    aug = [*args, "--set", "train.augment=joint"]
    whole, plain = tmp_path / "whole", tmp_path / "plain"
    run_cli("denoise", str(npy_input), "--out", str(whole), *aug)
    run_cli("denoise", str(npy_input), "--out", str(plain), *args)
    assert yaml.safe_load((whole / "config.yaml").read_text())["train"]["augment"] == "joint"
    assert np.abs(final_of(whole) - final_of(plain)).max() > 1e-3
    assert_predict_rebuilds(whole, tmp_path / "again.zarr")
    assert_resumes_to(whole, npy_input, tmp_path / "run", aug, "train:1:1")


def test_mean_channel_run_is_used_and_predict_rebuilds_it(npy_input, tmp_path):
    """model.mean_channel: the network gets the mean pattern's level as a 9th input (the run differs from the
    same run without it, config.yaml keeps it) and predict rebuilds that network from the saved weights."""
    import yaml

    args = [*SMOKE, "--cycles", "1", "--epochs", "3", "--set", "data.tile=4"]
    level, plain = tmp_path / "level", tmp_path / "plain"
    run_cli("denoise", str(npy_input), "--out", str(level), *args, "--set", "model.mean_channel=true")
    run_cli("denoise", str(npy_input), "--out", str(plain), *args)
    assert yaml.safe_load((level / "config.yaml").read_text())["model"]["mean_channel"] is True
    assert np.abs(final_of(level) - final_of(plain)).max() > 1e-3
    assert_predict_rebuilds(level, tmp_path / "again.zarr")


def test_ensemble_is_the_mean_of_its_seeds_runs_and_survives_kill_9(npy_input, tmp_path):
    """train.ensemble: member k is the network a run with seed ``train.seed + k`` trains, so the first cycle's
    cube is the mean of those runs' cubes; each member logs its own losses and keeps its own weights into the
    next cycle (a run killed before the second cycle's first checkpoint resumes to the same cube, as does one
    killed inside the second member), and predict rebuilds the average."""
    import torch

    from stemdist.layout import read_losses

    args = [*SMOKE, "--cycles", "2", "--epochs", "3", "--set", "data.tile=4", "--set", "train.average_epochs=2"]
    ens = [*args, "--set", "train.ensemble=2"]
    whole, seed0, seed1 = tmp_path / "whole", tmp_path / "seed0", tmp_path / "seed1"
    run_cli("denoise", str(npy_input), "--out", str(whole), *ens)
    run_cli("denoise", str(npy_input), "--out", str(seed0), *args, "--cycles", "1")  # the same first cycle
    run_cli("denoise", str(npy_input), "--out", str(seed1), *args, "--cycles", "1", "--set", "train.seed=1")
    first = lambda run: zarr.open_array(str(run / "denoised.zarr" / "cycle_01"), mode="r")[...]  # noqa: E731
    assert np.abs(first(seed0) - first(seed1)).max() > 1e-3  # the seeds differ ...
    np.testing.assert_allclose(first(whole), (first(seed0) + first(seed1)) / 2, rtol=1e-4, atol=1e-4)  # ... and average
    used = torch.load(whole / "weights" / "cycle_02.pt", map_location="cpu")
    assert len(used["average"]) == 4 and len(used["lasts"]) == 2
    assert not all(torch.equal(used["lasts"][0][k], used["lasts"][1][k]) for k in used["last"])
    rows = read_losses(whole)
    assert sorted((r["cycle"], r["member"]) for r in rows) == [(c, m) for c in (1, 2) for m in (0, 1) for _ in range(3)]
    assert (whole / "checkpoints" / "cycle_02" / "member_1" / "last.ckpt").exists()
    assert "inference averages the outputs of 4 networks: 2 seeds'" in (whole / "stemdist.log").read_text()
    assert_predict_rebuilds(whole, tmp_path / "again.zarr", cycles=2)
    run = tmp_path / "run"  # killed inside the second member, then before the second cycle's first checkpoint
    for fault in ("train:1:1:member1", "train:2:0"):
        killed = run_cli("denoise", str(npy_input), "--out", str(run), *ens, *(["--resume"] if run.exists() else []),
                         env={"STEMDIST_FAULT": fault}, check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("denoise", str(npy_input), "--out", str(run), *ens, "--resume")
    np.testing.assert_allclose(final_of(run), final_of(whole), rtol=1e-4, atol=1e-4)
