"""The command line end to end on real Zarr stores: outputs, input untouched, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from stemdist.cli import main
from stemdist.quality.metrics import relative_rmse
from stemdist.train.module import split_weights

from .conftest import SMOKE, run_cli


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
        h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


def test_denoise_smoke_writes_every_output_and_improves(tmp_path, smoke_cube):
    before = tree_digest(smoke_cube)
    run = tmp_path / "run"
    run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE, "--reference",
            str(smoke_cube / "truth"))
    assert tree_digest(smoke_cube) == before  # the input is never modified
    group = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    raw = zarr.open_array(str(smoke_cube / "noisy"), mode="r")
    for name in ("cycle_01", "cycle_02", "final"):
        arr = group[name]
        assert arr.attrs["complete"] is True
        assert arr.shape == raw.shape and arr.chunks == raw.chunks and arr.dtype == np.float32
    for f in ("unet_denoiser.pt", "config.yaml", "denoised.png", "run.json", "stemdist.log"):
        assert (run / f).stat().st_size > 0, f
    truth = zarr.open_array(str(smoke_cube / "truth"), mode="r")
    assert relative_rmse(group["final"], truth) < 0.6 * relative_rmse(raw, truth)
    assert (np.asarray(group["final"][...]) >= 0).all()
    plan = group["final"].attrs["fuse_plan"]  # chosen by SURE per detector region (default config)
    assert len(plan["rings"]) == 4 and len(plan["sectors"]) == 4 * 8 and 0 <= plan["detail_gain"] <= 1
    assert "chosen by SURE per detector region" in (run / "stemdist.log").read_text()


def test_keep_last_copy_borders_and_npy_input(tmp_path, small_cube):
    """A .npy input is converted into the run; keep_cycles=last leaves only the final cycle."""
    npy = tmp_path / "cube.npy"
    data = zarr.open_array(str(small_cube / "noisy"), mode="r")[...]
    np.save(npy, data)
    run = tmp_path / "run"
    run_cli("denoise", str(npy), "--out", str(run), *SMOKE, "--set", "output.keep_cycles=last",
            "--set", "data.borders=copy", "--cycles", "3")
    group = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["cycle_03", "final"]
    final, last = group["final"][...], group["cycle_03"][...]
    assert final.shape == data.shape and np.isfinite(final).all()
    # copy borders: every cycle's border is its blend's, (1 - beta) raw + beta previous, and so the raw counts
    border = np.ones(data.shape[:2], bool)
    border[1:-1, 1:-1] = False
    np.testing.assert_allclose(last[border], data[border].astype(np.float32), rtol=1e-6)
    assert not np.allclose(last[~border], data[~border])  # the interior is the network's
    assert zarr.open_array(str(run / "input.zarr"), mode="r")[...].tolist() == data.tolist()
    assert np.array_equal(np.load(npy), data)


def test_export_roundtrip(tmp_path, small_cube):
    out = tmp_path / "truth.npy"
    run_cli("export", str(small_cube / "truth"), str(out))
    np.testing.assert_array_equal(np.load(out), zarr.open_array(str(small_cube / "truth"), mode="r")[...])


def test_interrupted_run_finishes_with_resume(tmp_path, smoke_cube):
    run = tmp_path / "run"
    args = ["denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE, "--epochs", "8"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "stemdist", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "cycle_02" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a hard crash in the middle of cycle 2's training
    proc.wait()
    group = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    assert group["cycle_01"].attrs["complete"] is True
    assert "final" not in group and "cycle_02" not in group
    cycle1 = tree_digest(run / "denoised.zarr" / "cycle_01")
    proc = run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), "--resume", "--quiet")
    group = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    assert group["final"].attrs["complete"] is True and group["cycle_02"].attrs["complete"] is True
    assert tree_digest(run / "denoised.zarr" / "cycle_01") == cycle1  # not recomputed
    log = (run / "stemdist.log").read_text()
    assert "resuming after complete cycle 1 of 2" in log
    rows = [r.split(",") for r in (run / "logs" / "losses.csv").read_text().splitlines()[1:]]
    cycle2 = [int(r[1]) for r in rows if r[0] == "2"]
    assert set(cycle2) == set(range(8))
    assert cycle2.count(0) == 1  # resumed inside cycle 2 from its epoch checkpoint, not from scratch


def write_bad(tmp_path: Path, kind: str) -> list[str]:
    rng = np.random.default_rng(0)
    good = rng.poisson(1.0, (4, 5, 6, 6)).astype(np.float32)
    if kind == "3d":
        np.save(tmp_path / "x.npy", good[0])
    elif kind == "small-scan":
        np.save(tmp_path / "x.npy", good[:2])
    elif kind == "nan":
        good[1, 2, 3, 4] = np.nan
        np.save(tmp_path / "x.npy", good)
    elif kind == "inf":
        good[1, 2, 3, 4] = np.inf
        np.save(tmp_path / "x.npy", good)
    elif kind == "negative":
        good[3, 4, 0, 0] = -1
        np.save(tmp_path / "x.npy", good)
    elif kind == "missing":
        return [str(tmp_path / "nothing.npy")]
    elif kind == "h5-missing-key":
        with h5py.File(tmp_path / "x.h5", "w") as f:
            f["data"] = good
        return [str(tmp_path / "x.h5"), "--dataset", "wrong"]
    return [str(tmp_path / "x.npy")]


@pytest.mark.parametrize("kind,needle", [
    ("3d", "expected a 4-D cube"),
    ("small-scan", "at least 3 x 3"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("negative", "negative"),
    ("missing", "does not exist"),
    ("h5-missing-key", "no dataset 'wrong'"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, kind, needle):
    """In process (fast): the CLI returns status 2 with one line naming the problem; nothing is written."""
    args = write_bad(tmp_path, kind)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for cmd in (["denoise", *args, "--out", str(tmp_path / "run"), *SMOKE], ["convert", *args,
                                                                              str(tmp_path / "c.zarr")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "run").exists()
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_bad_input_exit_status_from_a_real_process(tmp_path):
    args = write_bad(tmp_path, "nan")
    proc = run_cli("denoise", *args, "--out", str(tmp_path / "run"), *SMOKE, check=False)
    assert proc.returncode == 2 and "NaN or infinite" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_zarr_input_values(tmp_path):
    from stemdist.io.zarr_store import create_cube

    arr = create_cube(tmp_path / "neg.zarr", None, (4, 4, 3, 3), 2, "float32")
    arr[...] = 1.0
    arr[3, 3, 2, 2] = -0.5
    proc = run_cli("denoise", str(tmp_path / "neg.zarr"), "--out", str(tmp_path / "run"), *SMOKE, check=False)
    assert proc.returncode == 2 and "negative" in proc.stderr


@pytest.mark.parametrize("extra,needle", [
    (["--set", "train.nope=1"], "unknown key train.nope"),
    (["--set", "train.batch_size=-4"], "train.batch_size must be >= 1"),
    (["--config", "no-such-config"], "not found"),
])
def test_bad_config_fails_before_any_work(tmp_path, smoke_cube, extra, needle):
    run = tmp_path / "run"
    proc = run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE, *extra, check=False)
    assert proc.returncode == 2 and needle in proc.stderr
    assert not run.exists()


def test_existing_run_dir_needs_resume(tmp_path, smoke_cube):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    proc = run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--resume" in proc.stderr
    assert (run / "precious.txt").read_text() == "keep me"
    proc = run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), "--resume", check=False)
    assert proc.returncode == 2 and "no stemdist run" in proc.stderr


def test_python_api(tmp_path, small_cube):
    import stemdist

    paths = stemdist.denoise(small_cube / "noisy", tmp_path / "run", "smoke", cycles=1, epochs=1,
                             output={"progress": False})
    assert zarr.open_array(str(paths.final), mode="r").attrs["complete"] is True
    assert json.loads((paths.root / "run.json").read_text())["shape"] == [10, 9, 12, 10]


def test_values_between_whole_numbers_get_one_warning_line_and_whole_floats_none(tmp_path, small_cube):
    """Counts stored as floats are counts; a cube in detector units (a gain, a subtracted dark) is not, and the
    Poisson loss and the fusion's noise model would be wrong for it: the run says so in one line."""
    import stemdist

    counts = zarr.open_array(str(small_cube / "noisy"), mode="r")[...].astype(np.float32)
    for name, cube, share in (("whole", counts, 0.0), ("gain", counts * np.float32(0.37), None)):
        npy = tmp_path / f"{name}.npy"
        np.save(npy, cube)
        paths = stemdist.denoise(npy, tmp_path / name, "smoke", cycles=1, epochs=1, output={"progress": False})
        info = json.loads((paths.root / "run.json").read_text())
        log = paths.log_file.read_text()
        if share is not None:
            assert info["not_whole"] == share and "not whole numbers" not in log
        else:
            expected = float(np.mean(np.round(cube) != cube))
            assert info["not_whole"] == pytest.approx(expected) and expected > 0.3  # zeros stay whole
            assert f"WARNING {100 * expected:.1f}% of the input's values are not whole numbers" in log
        np.testing.assert_array_equal(np.load(npy), cube)  # the input is left as it was


def test_one_grid_for_tiles_and_chunks(small_cube, tmp_path):
    """An input chunked by scan rows is rechunked into the run (the log says so): training tiles, inference tiles
    and every output share data.tile's grid."""
    rows = zarr.create_array(store=str(tmp_path / "rows.zarr"), shape=(10, 9, 12, 10), chunks=(1, 9, 12, 10),
                             dtype="uint16")
    rows[:] = zarr.open_array(str(small_cube / "noisy"), mode="r")[...]
    run = tmp_path / "run"
    run_cli("denoise", str(tmp_path / "rows.zarr"), "--out", str(run), *SMOKE, "--cycles", "1", "--set",
            "data.tile=4")
    assert "rechunked into" in (run / "stemdist.log").read_text()
    for path in (run / "input.zarr", run / "denoised.zarr" / "cycle_01", run / "denoised.zarr" / "final"):
        assert zarr.open_array(str(path), mode="r").chunks == (4, 4, 12, 10), path
    assert zarr.open_array(str(tmp_path / "rows.zarr"), mode="r").chunks == (1, 9, 12, 10)  # input untouched


def test_min_samples_gives_a_small_scan_more_epochs_and_bright_field_fusion_stays_available(tmp_path, small_cube):
    """10 x 9 positions: 3 epochs are 270 samples; train.min_samples 450 would make it 5 epochs, train.max_epochs
    4 keeps it to 4."""
    run = tmp_path / "run"
    run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE, "--set", "train.min_samples=450",
            "--set", "train.max_epochs=4", "--set", "train.cycles=1", "--set", "output.fuse_by=bright_field")
    from stemdist.layout import read_losses

    assert [r["epoch"] for r in read_losses(run)] == [0, 1, 2, 3]
    log = (run / "stemdist.log").read_text()
    assert ("4 epochs instead of train.epochs 3 (train.max_epochs; train.min_samples 450 would make it 5 over 90 "
            "positions)") in log
    assert "chosen by SURE on the raw bright-field image" in log
    final = zarr.open_group(str(run / "denoised.zarr"), mode="r")["final"]
    assert 0 <= final.attrs["fuse_sigma"] <= 4 and "fuse_plan" not in final.attrs


def test_five_by_five_window_trains_denoises_and_predicts(tmp_path, smoke_cube):
    """model.window=5: 24 input channels, copy borders keep a two-position frame, the final beats the raw
    counts, and `stemdist predict` with the run's weights reproduces its network cube."""
    run = tmp_path / "run"
    run_cli("denoise", str(smoke_cube / "noisy"), "--out", str(run), *SMOKE, "--cycles", "1",
            "--set", "model.window=5", "--set", "data.borders=copy")
    import torch

    weights, _ = split_weights(torch.load(run / "unet_denoiser.pt", map_location="cpu"))
    assert [w.shape[1] for w in weights.values() if w.ndim == 4][0] == 24  # the first convolution's inputs
    group = zarr.open_group(str(run / "denoised.zarr"), mode="r")
    raw = zarr.open_array(str(smoke_cube / "noisy"), mode="r")[...]
    net = group["cycle_01"][...]
    frame = np.ones(raw.shape[:2], bool)
    frame[2:-2, 2:-2] = False
    np.testing.assert_array_equal(net[frame], raw[frame].astype(np.float32))
    truth = zarr.open_array(str(smoke_cube / "truth"), mode="r")
    assert relative_rmse(group["final"], truth) < 0.6 * relative_rmse(raw, truth)
    run_cli("predict", str(run), str(smoke_cube / "noisy"), str(tmp_path / "p.zarr"), "--quiet")
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[...], net, rtol=1e-5, atol=1e-5)


def test_cosine_lr_schedule_holds_through_the_warm_up_and_ends_at_the_floor(tmp_path, small_cube):
    import torch

    from stemdist.train.module import LR_FLOOR, cosine_factor

    assert [cosine_factor(s, 10, 30) for s in (0, 9, 10)] == [1.0, 1.0, 1.0]
    assert cosine_factor(20, 10, 30) == pytest.approx((1 + LR_FLOOR) / 2) and cosine_factor(30, 10, 30) == LR_FLOOR
    run = tmp_path / "run"
    run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE, "--cycles", "1", "--epochs", "4",
            "--set", "train.lr_schedule=cosine", "--set", "train.lr=0.002")
    ckpt = torch.load(run / "checkpoints" / "cycle_01" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == ckpt["global_step"] > 0
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.002 * LR_FLOOR)


def test_grad_clip_reaches_the_trainer_and_the_loss_log_holds_each_epochs_largest_gradient_norm(tmp_path, small_cube):
    from stemdist.config import load
    from stemdist.layout import RunPaths, read_losses
    from stemdist.run.ranks import Ranks
    from stemdist.train.trainer import trainer

    run = tmp_path / "run"
    run_cli("denoise", str(small_cube / "noisy"), "--out", str(run), *SMOKE, "--set", "train.cycles=1",
            "--set", "train.grad_clip=0.5")
    rows = read_losses(run)
    assert rows and all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    config = load(run / "config.yaml")
    assert config.train.grad_clip == 0.5
    t = trainer(config, Ranks(), RunPaths(tmp_path / "other"), 1, "cpu", "32-true", steps_per_epoch=1)
    assert (t.gradient_clip_val, t.gradient_clip_algorithm) == (0.5, "norm")
    off = trainer(load(None), Ranks(), RunPaths(tmp_path / "other"), 1, "cpu", "32-true", steps_per_epoch=1)
    assert off.gradient_clip_val is None


@pytest.mark.parametrize("dose,width,warmup", [(20.0, 16, 2), (150.0, 24, 4)])
def test_auto_network_size_follows_the_counts_per_pattern(tmp_path, dose, width, warmup):
    """model.base_width / train.warmup_epochs auto: the narrow network below 85 counts per pattern, the wide one
    above; the run's saved config holds the sizes it trained (so `predict` rebuilds the same network)."""
    from stemdist import config as cfg
    from stemdist.io.synth import synth

    cube = tmp_path / "cube.zarr"
    synth(cube, (8, 8), (16, 16), dose=dose, seed=3, tile=4)
    run = tmp_path / "run"
    args = ["denoise", str(cube / "noisy"), "--out", str(run), *SMOKE, "--cycles", "1", "--epochs", "6",
            "--set", "model.base_width=auto", "--set", "train.warmup_epochs=auto"]
    run_cli(*args)
    run_cli(*args, "--resume")  # the same command resumes: auto is the size it resolved to
    wider = run_cli(*args, "--resume", "--set", "model.base_width=40", check=False)
    assert wider.returncode != 0 and f"model.base_width was {width} and cannot become 40" in wider.stderr
    saved = cfg.load(run / "config.yaml")
    assert (saved.model.base_width, saved.train.warmup_epochs) == (width, warmup)
    log = (run / "stemdist.log").read_text()
    assert f"sized from the counts: model.base_width {width}, train.warmup_epochs {warmup} (auto: " in log
    assert f"counts per pattern, {'below' if width == 16 else 'at or above'} 85)" in log
    import torch

    weights, _ = split_weights(torch.load(run / "unet_denoiser.pt", map_location="cpu"))
    assert [w.shape[0] for w in weights.values() if w.ndim == 4][0] == width  # the first convolution's outputs
    from stemdist.layout import read_losses

    phases = [r["phase"] for r in read_losses(run)]
    assert phases == ["warmup"] * min(warmup, 3) + ["poisson"] * (6 - min(warmup, 3))  # at most half the epochs
    if width == 16:
        run_cli("predict", str(run), str(cube / "noisy"), str(tmp_path / "p.zarr"), "--quiet")
        net = zarr.open_group(str(run / "denoised.zarr"), mode="r")["cycle_01"][...]
        np.testing.assert_allclose(zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[...], net, rtol=1e-5,
                                   atol=1e-5)
