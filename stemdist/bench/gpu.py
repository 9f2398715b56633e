"""``stemdist bench gpu``: the GPU path proven and measured in one call (``--smoke``: its CPU form, for CI).

One table, three parts:

- correctness: a short ``denoise`` of a synthetic cube in bf16-mixed and in 32-bit (final cubes agree within
  ``TOLERANCE`` and both beat the raw cube against the truth), ``hardware.compile: true`` against eager (CUDA
  only: on a CPU the compile alone takes minutes), and ``torchrun --nproc-per-node 1`` (NCCL on CUDA, gloo
  on a CPU) completing;
- speed per device at several detector sizes: training samples/s with the share of step time waiting for
  the loader (``stemdist bench train``'s measurement), inference patterns/s through the full pass (read,
  predict, write) against forward passes alone, and the share of the bf16 dense ceiling reached (FLOPs
  per pattern counted on the network; the ceiling from the device's name);
- the loader's decode rate (GB/s of float32 patterns delivered) per number of loader workers, so a
  cluster user knows how many CPU cores feed one GPU.

On a machine without CUDA it says so in one line and runs the CPU smoke of the same table.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from . import common

# bf16-mixed vs 32-bit: two trainings that part ways at the first rounding; the final cubes may differ by this
# relative L2 norm, and the bf16 cube's error against the truth may exceed the 32-bit one's by this factor
TOLERANCE, ERROR_FACTOR = 0.2, 1.25
CEILINGS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
            "A10": 125e12, "V100": 125e12}  # dense bf16 (V100: fp16) tensor FLOP/s, by device name


CAMERA = (87_000, 576)  # a 4D Camera's patterns/s and pattern edge


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "CPU-sized cubes and network (CI; what runs where there is no CUDA)")
    p.add_argument("--dets", type=int, nargs="+", default=[64, 128, 256], help="detector edges to time")
    p.add_argument("--scan", type=int, default=64, help="scan edge of the timed cubes")
    p.add_argument("--batch-size", type=int, default=64, help="training and inference batch size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                   help="loader workers to time (training uses the most of them)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs timed per size (first = warm-up)")


def _progress(row: list) -> None:
    """One line per finished row on stderr, so a run cut short by a lease still shows what it measured."""
    from ..console import QUIET

    if not QUIET:
        print("  .. " + " | ".join(str(c) for c in row), file=sys.stderr, flush=True)


def ceiling(name: str) -> float | None:
    return next((v for k, v in CEILINGS.items() if k in name), None)


def _denoise(cube: Path, out: Path, sets: list[str], quiet: bool = True) -> np.ndarray:
    from .. import config as cfg
    from ..api import run_denoise

    config = cfg.load("smoke", cfg.parse_overrides(sets))
    paths = run_denoise(cube / "noisy", out, config)
    return zarr.open_array(str(paths.final), mode="r")[...]


class _Rows(list):
    def append(self, row: list) -> None:
        _progress(row)
        super().append(row)


def correctness(root: Path, cuda: bool, smoke: bool) -> list[list[str]]:
    """Rows: bf16 vs 32-bit, compile vs eager, torchrun with one process."""
    from ..quality.metrics import relative_rmse

    scan, det = (10, 16) if smoke else (24, 64)
    cube = common.synth_cube(root, (scan, scan), (det, det), tile=8, seed=1)
    truth = zarr.open_array(str(cube / "truth"), mode="r")[...]
    raw_err = relative_rmse(zarr.open_array(str(cube / "noisy"), mode="r")[...], truth)
    accel = "gpu" if cuda else "cpu"
    base = [f"hardware.accelerator={accel}", "train.cycles=1", f"train.epochs={3 if smoke else 6}",
            "data.num_workers=0"]
    rows = _Rows()
    t0 = time.perf_counter()
    f32 = _denoise(cube, root / "run-fp32", base + ["hardware.precision=32"])
    bf16 = _denoise(cube, root / "run-bf16", base + ["hardware.precision=bf16-mixed"])
    diff = float(np.linalg.norm(bf16 - f32) / np.linalg.norm(f32))
    e32, e16 = relative_rmse(f32, truth), relative_rmse(bf16, truth)
    ok = diff <= TOLERANCE and e32 < raw_err and e16 < min(raw_err, ERROR_FACTOR * e32)
    rows.append(["bf16-mixed vs 32-bit final cube", f"rel. diff {diff:.3g} (<= {TOLERANCE}); error vs truth "
                 f"raw {raw_err:.3f}, fp32 {e32:.3f}, bf16 {e16:.3f} (<= {ERROR_FACTOR} x fp32)",
                 "ok" if ok else "FAILED",
                 f"{time.perf_counter() - t0:.0f}"])
    t0 = time.perf_counter()
    if cuda:
        comp = _denoise(cube, root / "run-compile", base + ["hardware.precision=32", "hardware.compile=true"])
        cdiff = float(np.linalg.norm(comp - f32) / np.linalg.norm(f32))
        rows.append(["compile: true vs eager (32-bit)", f"rel. diff {cdiff:.3g} (<= {TOLERANCE})",
                     "ok" if cdiff <= TOLERANCE else "FAILED", f"{time.perf_counter() - t0:.0f}"])
    else:
        rows.append(["compile: true vs eager (32-bit)", "not run without CUDA (compiling alone takes minutes)",
                     "skipped", "0"])
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
           "stemdist", "denoise", str(cube / "noisy"), "--out", str(root / "run-torchrun"), "--config", "smoke",
           "--quiet", *[a for s in base for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    backend = "NCCL" if cuda else "gloo"
    rows.append([f"torchrun --nproc-per-node 1 ({backend})", f"exit status {proc.returncode}",
                 "ok" if proc.returncode == 0 else "FAILED: " + proc.stderr.strip().splitlines()[-1:][0]
                 if proc.stderr.strip() else "FAILED", f"{time.perf_counter() - t0:.0f}"])
    return rows


def flops_per_pattern(module: torch.nn.Module, det: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 8, det, det, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return float(counter.get_total_flops())


def inference_speed(cube: Path, out: Path, module, device: torch.device, batch: int, dtype) -> dict:
    """Patterns/s of the full inference pass and of forward passes alone on the same batches."""
    from ..data.tiles import BlockReader, Grid, flat_index, tile_positions
    from ..io.zarr_store import ChunkWriter, create_cube
    from ..run import hardware
    from ..run.inference import ReadAhead, infer

    raw = zarr.open_array(str(cube / "noisy"), mode="r")
    target = create_cube(out, None, raw.shape, raw.chunks[:2], "float32", overwrite=True)
    grid = Grid.of(target)
    reader = BlockReader(raw, None, 0.0, grid=grid)
    batches = []
    for t in range(grid.n_tiles):
        block = reader.block(t)
        patterns = torch.from_numpy(block.reshape(-1, *block.shape[2:])).to(device)
        ii, jj = tile_positions(grid, t, "reflect")
        index = torch.from_numpy(flat_index(np.zeros(len(ii), np.int64), ii, jj, block.shape[:2])[:, :8])
        batches += [patterns[index[s:s + batch].to(device)] for s in range(0, len(ii), batch)]
    n = sum(len(b) for b in batches)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def forward_only() -> None:
        for x in batches:
            with hardware.autocast(device, dtype):
                module(x)
        sync()

    threads = hardware.io_threads()

    def full_pass() -> None:
        infer(module, raw, None, 0.0, target, borders="reflect", batch_size=batch, device=device, autocast=dtype,
              threads=threads)
        sync()

    readers = ReadAhead(raw, None, 0.0, grid, 24, threads, pin=device.type == "cuda")

    def read_only() -> None:  # the pass's reader threads alone: tiles with halo into (pinned) buffers
        for _, _, buf in readers(range(grid.n_tiles)):
            readers.free.put(buf)

    chunk = np.random.default_rng(0).random(target.chunks, dtype=np.float32) * 3
    writer = ChunkWriter(target)

    def write_only() -> None:  # the pass's writer threads alone: compress and write every chunk
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda t: writer.write(*divmod(t, grid.shape[1]), chunk.copy()), range(grid.n_tiles)))

    forward_only()  # warm-up (cuDNN autotuning, allocations)
    times = common.interleaved({"pass": full_pass, "forward": forward_only, "read": read_only, "write": write_only},
                               3, warmup=0)
    return {k: n / common.median(v) for k, v in times.items()}


def training_speed(cube: Path, root: Path, args, width: int, depth: int, workers: int, accel: str) -> dict:
    from .train import _one

    ns = types.SimpleNamespace(config=None, epochs=args.epochs, beta=0.0, set=[
        f"model.base_width={width}", f"model.depth={depth}", f"train.batch_size={args.batch_size}",
        f"hardware.accelerator={accel}"])
    return _one(cube, workers, ns, root)


def decode_rate(cube: Path, workers: int, batch: int, epochs: int = 3) -> float:
    """GB/s of float32 patterns the sharded loader delivers (groups from ``workers`` persistent processes,
    released as the trainer releases them), in the steady state: the first epoch (start-up) is not timed."""
    from torch.utils.data import DataLoader

    from ..data.dataset import NeighbourPatches
    from ..train.trainer import _worker_init

    ds = NeighbourPatches(str(cube / "noisy"), None, 0.0, batch_size=batch, num_workers=workers, shuffle_tiles=8)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=_worker_init if workers else None,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    rates = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        t0, nbytes = time.perf_counter(), 0
        groups = iter(loader)
        for group in groups:
            nbytes += group[0].numel() * 4
            ds.release(group)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    del groups, loader  # stops the persistent workers (and frees their shared buffers) now, not at exit
    return common.median(rates[1:])


def run(args: argparse.Namespace) -> int:
    from ..config import ModelConfig, TrainConfig
    from ..run import hardware
    from ..train.module import Denoiser

    cuda = torch.cuda.is_available()
    if not cuda:
        print("bench gpu: no CUDA device here - running the CPU smoke of the GPU table")
        args.smoke = True
    if args.smoke:
        args.dets, args.scan, args.workers, args.epochs = [16, 32], 8, [1], 2
        args.batch_size = min(args.batch_size, 16)
    width, depth = (4, 2) if args.smoke and not cuda else (24, 4)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = ceiling(name)
    bf16 = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if cuda:
        hardware.cuda_flags()
    rows, speed, feed = [], _Rows(), _Rows()
    t_start = time.perf_counter()
    with common.workdir(args.workdir, "stemdist-bench-gpu-") as root:
        rows = correctness(root / "correctness", cuda, args.smoke)
        for det in args.dets:
            cube = common.synth_cube(root, (args.scan, args.scan), (det, det), tile=8, seed=det)
            module = Denoiser(ModelConfig(base_width=width, depth=depth), TrainConfig(),
                              channels_last=cuda).to(device).eval()
            flops = flops_per_pattern(module, det, device)
            inf = inference_speed(cube, root / f"infer-{det}.zarr", module, device, args.batch_size, bf16)
            tr = training_speed(cube, root / f"train-{det}", args, width, depth, max(args.workers),
                                "gpu" if cuda else "cpu")
            achieved = flops * inf["forward"]
            share = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
            speed.append([f"{det}x{det}", common.fmt_rate(tr["samples_s"]), f"{tr['wait_pct']:.1f}%",
                          common.fmt_rate(inf["pass"]), common.fmt_rate(inf["forward"]),
                          f"{inf['pass'] / inf['forward']:.2f}", common.fmt_rate(inf["read"]),
                          common.fmt_rate(inf["write"]), f"{flops / 1e9:.2f}", f"{achieved / 1e12:.2f}", share])
        det = args.dets[-1]
        cube = common.synth_cube(root, (args.scan, args.scan), (det, det), tile=8, seed=det)
        for w in args.workers:
            rate = decode_rate(cube, w, args.batch_size)
            feed.append([w, f"{rate:.3g}", f"{rate / max(w, 1):.3g}"])
    print(f"GPU benchmark on {name}: U-Net width {width} depth {depth}, batch {args.batch_size}, scan "
          f"{args.scan}x{args.scan}, precision {hardware.AUTOCAST_NAMES.get(bf16, '32-bit')}, "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print(common.table(["check", "measured", "result", "s"], rows))
    print(common.table(["patterns", "train samples/s", "data wait", "pass patterns/s", "forward patterns/s",
                        "pass / forward", "read patterns/s", "write patterns/s", "GFLOP/pattern", "TFLOP/s",
                        "of bf16 ceiling"], speed))
    print(common.table(["loader workers", f"GB/s decoded ({det}x{det})", "GB/s per worker"], feed))
    if cuda:  # the network's cost grows with the pattern's area: scale the largest size's measured rate
        rate = inf["pass"] * (det / CAMERA[1]) ** 2
        how = "measured" if det == CAMERA[1] else f"the full pass at {det}x{det}, scaled by the pattern's area"
        print(f"a 4D Camera ({CAMERA[0]:,} patterns/s of {CAMERA[1]}x{CAMERA[1]}): {rate:,.0f} patterns/s per GPU "
              f"through the full pass ({how}), so {math.ceil(CAMERA[0] / rate)} GPUs keep up")
    failed = sum(r[2].startswith("FAILED") for r in rows)
    skipped = sum(r[2] == "skipped" for r in rows)
    print(f"gpu checks: {len(rows) - failed - skipped} passed, {skipped} skipped, {failed} failed on {name}")
    return 1 if failed else 0
