"""``stemdist bench memory``: peak RSS of ``stemdist denoise`` on synthetic cubes of growing size.

Each cube is written chunk by chunk (bounded memory) as float64 "gain-corrected counts" (Poisson counts
times a per-pixel gain, plus readout noise), which compress poorly, so that the largest cube really
takes gigabytes on disk (measured with the allocated blocks, like ``du``). Then ``stemdist denoise`` runs
in a subprocess on each cube with the smoke protocol (smoke configuration, one cycle of one epoch,
``--set`` overrides below) and two loader workers. Its peak memory is measured two ways:

- the peak RSS of the largest single process of the run (``wait4``'s ``ru_maxrss``: exact, includes
  short spikes);
- the peak of the summed RSS of the run's process tree (the main process and its loader workers):
  every 0.02 s the high-water marks (VmHWM) of its live processes are read from ``/proc`` and summed
  (pages shared after fork are counted once per process). A sample can still miss a process that
  lives for less than one interval: when the runs saw different numbers of processes at once, their
  tree sums are not comparable, and the growth is the largest process's alone (said so in the output).

Training is capped at ``--train-batches`` batches per epoch (Lightning's ``PL_TRAINER_LIMIT_TRAIN_BATCHES``)
so that the time stays bounded: the training plan still covers the whole cube, and the inference pass,
the value checks, the final cube and the figure stream over every pattern. ``--train-batches 0`` visits
every sample. Headline: growth of the peak from the smallest to the largest cube (goal <= 5%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..io.synth import LATTICE, expected_patterns
from ..io.zarr_store import create_cube
from . import common

GOAL = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "two tiny cubes (CI)")
    p.add_argument("--scans", type=int, nargs="+", default=[64, 128, 256],
                   help="scan edges, growing (the largest at least 2x the smallest: 4x the positions)")
    p.add_argument("--det", type=int, default=64, help="detector edge")
    p.add_argument("--tile", type=int, default=16, help="scan tile (chunk) edge")
    p.add_argument("--dose", type=float, default=1e4, help="electrons per pattern")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the denoise run")
    p.add_argument("--train-batches", type=int, default=16,
                   help="training batches per epoch (0: every sample, the full epoch)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="more overrides for the denoise runs")


PROTOCOL = ["--config", "smoke", "--cycles", "1", "--epochs", "1", "--set", "model.base_width=2",
            "--set", "model.depth=1", "--set", "inference.batch_size=256", "--quiet"]


def gain_corrected_cube(path: Path, scan: int, det: int, dose: float, tile: int, seed: int) -> int:
    """Write ``path`` (a float64 Zarr cube) chunk by chunk; return its bytes on disk. Reused if complete."""
    stamp = path.parent / (path.name + ".complete")
    if not stamp.exists():
        shape = (scan, scan, det, det)
        arr = create_cube(path, None, shape, tile, "float64", overwrite=True)
        # the synthetic signal is periodic over LATTICE positions: one period of expected patterns
        n = int(LATTICE)
        yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        period = expected_patterns(yy.ravel(), xx.ravel(), det, det, dose).reshape(n, n, det, det)
        gain = 1.0 + 0.03 * common.rng(seed, 0).standard_normal((det, det))
        g = -(-scan // tile)
        for cy in range(g):
            for cx in range(g):
                y0, y1, x0, x1 = cy * tile, min(scan, (cy + 1) * tile), cx * tile, min(scan, (cx + 1) * tile)
                lam = period[np.arange(y0, y1)[:, None] % n, np.arange(x0, x1)[None, :] % n]
                r = common.rng(seed, 1, cy, cx)
                block = r.poisson(lam).astype(np.float64) * gain
                block += 0.05 * r.standard_normal(block.shape)
                np.maximum(block, 0.0, out=block)  # counts stay >= 0
                arr[y0:y1, x0:x1] = block
        stamp.write_text("ok")
    return common.du(path)


def _tree_peaks(pid: int) -> list[int]:
    """Peak RSS so far (VmHWM, bytes) of ``pid`` and of each live descendant, from /proc; [] without /proc.

    A high-water mark is its process's exact peak, so a sample between two spikes still holds them.
    """
    peaks, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) * 1024)
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return peaks


def measure(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; its wall time, exit status, peak single-process RSS and peak summed tree RSS."""
    tree = {"bytes": 0, "processes": 0}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll():
            while not done.is_set():
                peaks = _tree_peaks(proc.pid)
                tree["bytes"] = max(tree["bytes"], sum(peaks))
                tree["processes"] = max(tree["processes"], len(peaks))
                done.wait(0.02)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
    return {"rc": proc.returncode, "wall": wall, "maxrss": usage.ru_maxrss * scale,
            "tree": tree["bytes"], "processes": tree["processes"]}


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        args.scans, args.det, args.tile, args.train_batches, args.workers = [8, 16], 16, 4, 0, 1
    scans = sorted(args.scans)
    if len(scans) < 2 or scans[-1] ** 2 < 4 * scans[0] ** 2:
        raise SystemExit("bench memory: give at least two cubes, the largest with >= 4x the positions")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.train_batches:
        env["PL_TRAINER_LIMIT_TRAIN_BATCHES"] = str(args.train_batches)
    protocol = PROTOCOL + ["--set", f"data.num_workers={args.workers}"]
    for s in args.set:
        protocol += ["--set", s]
    rows, results = [], []
    with common.workdir(args.workdir, "stemdist-bench-memory-") as root:
        for n in scans:
            cube = root / f"gain_{n}x{n}x{args.det}x{args.det}_d{args.dose:g}_t{args.tile}.zarr"
            t0 = time.perf_counter()
            disk = gain_corrected_cube(cube, n, args.det, args.dose, args.tile, args.seed)
            gen = time.perf_counter() - t0
            run_dir = root / f"run_{n}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cmd = [sys.executable, "-m", "stemdist", "denoise", str(cube), "--out", str(run_dir)] + protocol
            r = measure(cmd, env, root / f"denoise_{n}.log")
            if r["rc"] != 0:
                print((root / f"denoise_{n}.log").read_text()[-3000:], file=sys.stderr)
                raise SystemExit(f"bench memory: stemdist denoise failed on the {n}x{n} cube ({r['rc']})")
            out_disk = common.du(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            raw_bytes = n * n * args.det * args.det * 8
            results.append(r)
            rows.append([f"{n}x{n}x{args.det}x{args.det}", f"{n * n:,}", common.gb(raw_bytes),
                         common.gb(disk), common.gb(out_disk), f"{gen:.0f}", f"{r['wall']:.0f}",
                         f"{r['maxrss'] / 2**20:.0f}", f"{r['tree'] / 2**20:.0f}",
                         str(r["processes"])])
    print(f"memory benchmark: `stemdist denoise CUBE {' '.join(protocol)}`"
          + (f" with PL_TRAINER_LIMIT_TRAIN_BATCHES={args.train_batches}" if args.train_batches else "")
          + f"; float64 cubes, dose {args.dose:g}, tile {args.tile}")
    print(common.table(["cube", "patterns", "GB in memory", "GB on disk", "GB written", "gen s", "denoise s",
                        "peak RSS MiB (largest process)", "peak RSS MiB (process tree)",
                        "processes"], rows))
    g_max = 100 * (results[-1]["maxrss"] / results[0]["maxrss"] - 1)
    first, last = results[0], results[-1]
    comparable = first["tree"] and first["processes"] == last["processes"]
    g_tree = 100 * (last["tree"] / first["tree"] - 1) if comparable else g_max
    print(f"growth from the smallest to the largest cube: largest process {g_max:+.1f}%, process tree "
          + (f"{g_tree:+.1f}%" if comparable else
             f"not compared ({first['processes']} vs {last['processes']} processes seen at once)")
          + f"; cube {rows[-1][3]} GB on disk vs {rows[0][3]} GB")
    print(f"memory growth {max(g_max, g_tree):.1f}% (goal <= {GOAL:g}%)")
    return 0
