"""``stemdist bench fusion``: the final cube's fusion with the raw counts, per detector size.

The ``regions`` fusion (``output.fuse_by``'s default) runs after the last cycle, on CPUs: rank 0 chooses
its plan by SURE on up to :data:`stemdist.run.fusion.SAMPLE_CHUNKS` scan chunks, each with a halo as deep as
the widest smoothing it tries (the other ranks wait), then every rank writes its own chunks of the final
cube. Measured on a synthetic cube per detector size, chunked as ``data.tile: null`` chunks it, the
"network" a noisy, biased copy of the truth: the plan's seconds and the write's patterns/s.

Headline: the plan's seconds at the largest detector (goal <= 60 s: a minute while every GPU waits).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zarr

from ..data.tiles import Grid
from ..io.zarr_store import create_cube, default_tile
from ..quality.metrics import find_masks
from ..quality.sure import sure_sigma
from ..run import fusion
from . import common

GOAL_S = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "a 8 x 8 scan of 16 x 16 patterns (CI)")
    p.add_argument("--scan", type=int, default=32, help="scan edge")
    p.add_argument("--dets", type=int, nargs="+", default=[64, 128, 256], help="detector edges")
    p.add_argument("--sectors", type=int, default=fusion.SECTORS, help="sectors per ring (output.fuse_sectors)")
    p.add_argument("--threads", type=int, default=1, help="chunks written at once")


def _case(root, scan: int, det: int, sectors: int, threads: int, seed: int) -> list:
    tile = default_tile((scan, scan, det, det))
    path = common.synth_cube(root, (scan, scan), (det, det), tile=tile, seed=seed)
    raw = zarr.open_array(str(path / "noisy"), mode="r")
    truth = zarr.open_array(str(path / "truth"), mode="r")
    den = create_cube(root / f"network_{det}.zarr", None, raw.shape, tile, "float32", overwrite=True)
    rng = common.rng(seed, det)
    mean = np.zeros((det, det))
    for y in range(0, scan, tile):  # the network 10% off at random; the counts' mean pattern
        block = truth[y:y + tile]
        den[y:y + tile] = block * rng.uniform(0.9, 1.1, block.shape).astype(np.float32)
        mean += raw[y:y + tile].sum(axis=(0, 1), dtype=np.float64) / (scan * scan)
    bf = find_masks(mean).bf((det, det)) > 0
    raw_bf = np.concatenate([raw[y:y + tile][..., bf].sum(axis=-1, dtype=np.float64) for y in range(0, scan, tile)])
    t0 = time.perf_counter()
    plan = fusion.plan_regions(raw, den, mean, sectors, sure_sigma(raw_bf) / 2, wiener=True)
    plan_s = time.perf_counter() - t0
    out = create_cube(root / f"final_{det}.zarr", None, raw.shape, tile, "float32", overwrite=True)
    write_s = common.timed(lambda: fusion.fuse_into(out, raw, den, plan, threads=threads))
    n = Grid.of(raw).n_tiles
    return [f"{det}x{det}", tile, f"{min(fusion.SAMPLE_CHUNKS, n)} of {n}", f"{plan_s:.1f}", f"{write_s:.2f}",
            common.fmt_rate(scan * scan / write_s), f"{plan.share_sigma:g} / {plan.detail_sigma:g}"]


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        args.scan, args.dets = 8, [16]
    rows = []
    with common.workdir(args.workdir, "stemdist-bench-fusion-") as root:
        for det in args.dets:
            rows.append(_case(root, args.scan, det, args.sectors, args.threads, args.seed))
    print(f"fusion benchmark: {args.scan}x{args.scan} scans, {args.sectors} sectors per ring, the write "
          f"{args.threads} chunk(s) at a time, the plan up to {fusion.chunk_threads()} (fewer for large blocks)")
    print(common.table(["patterns", "tile", "chunks scored", "plan s", "write s", "write patterns/s",
                        "shares / detail s"], rows))
    plan_s = float(rows[-1][3])
    print(f"fusion plan {plan_s:.1f} s at {rows[-1][0]} (goal <= {GOAL_S:g} s)")
    return 0
