"""``stemdist bench infer``: the inference pass against pure forward passes and one pattern at a time.

Contenders, same network and cube, measured in turns in one run:

- ``inference pass``: :func:`stemdist.inference.infer` as a cycle runs it: tiles with halo read from the
  compressed Zarr store and blended on the fly (read-ahead thread), predicted in batches, written back
  as compressed Zarr chunks (writer thread);
- ``forward only``: the network on the very same batches, already gathered in memory (no I/O at all):
  the ceiling the inference pass can approach when its I/O is hidden behind compute;
- ``one pattern at a time``: the reference's inference, batch 1, on the first ``--ref-patterns``
  patterns of the in-memory batches (its rate is per pattern, so a subset suffices).

Headline: patterns/s of the inference pass over forward only (goal >= 0.8).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import zarr

from ..config import ModelConfig, TrainConfig
from ..data.tiles import BlockReader, Grid, flat_index, tile_positions
from ..io.zarr_store import create_cube
from ..run.inference import infer
from ..train.module import Denoiser
from . import common

GOAL = 0.8


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "tiny cube and network, one repetition (CI)")
    p.add_argument("--scan", type=int, default=32, help="scan edge")
    p.add_argument("--det", type=int, default=64, help="detector edge")
    p.add_argument("--tile", type=int, default=16, help="scan tile (chunk) edge")
    p.add_argument("--width", type=int, default=24, help="U-Net base width (default: the default config's)")
    p.add_argument("--depth", type=int, default=4, help="U-Net depth")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    p.add_argument("--beta", type=float, default=0.5, help="blend weight of the denoised cube")
    p.add_argument("--ref-patterns", type=int, default=64, help="patterns timed one at a time")
    p.add_argument("--reps", type=int, default=3, help="timed passes per contender")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        args.scan, args.det, args.tile, args.width, args.depth = 8, 16, 4, 8, 2
        args.reps, args.ref_patterns = 1, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    module = Denoiser(ModelConfig(base_width=args.width, depth=args.depth), TrainConfig(), channels_last=False).eval()
    B = args.batch_size
    with common.workdir(args.workdir, "stemdist-bench-infer-") as root:
        path = common.synth_cube(root, (args.scan, args.scan), (args.det, args.det), tile=args.tile,
                                 seed=args.seed)
        raw = zarr.open_array(str(path / "noisy"), mode="r")
        den = zarr.open_array(str(path / "truth"), mode="r")
        out = create_cube(root / "bench-infer-out.zarr", None, raw.shape, args.tile, "float32",
                                  overwrite=True)
        grid = Grid.of(out)
        # the same batches as the inference pass, gathered once into memory
        reader = BlockReader(raw, den, args.beta, grid=grid)
        batches = []
        for t in range(grid.n_tiles):
            block = reader.block(t)
            patterns = block.reshape(-1, *block.shape[2:])
            ii, jj = tile_positions(grid, t, "reflect")
            for s in range(0, len(ii), B):
                i, j = ii[s:s + B], jj[s:s + B]
                index = flat_index(np.zeros(len(i), np.int64), i, j, block.shape[:2])[:, :8]
                batches.append(torch.from_numpy(patterns[index]))
        n = sum(len(x) for x in batches)
        single = torch.cat(batches)[:args.ref_patterns].split(1)

        @torch.inference_mode()
        def forward_only():
            for x in batches:
                module(x)

        @torch.inference_mode()
        def one_at_a_time():
            for x in single:
                module(x)

        def inference_pass():
            infer(module, raw, den, args.beta, out, borders="reflect", batch_size=B, device=device)

        with torch.inference_mode():
            module(batches[0])  # first-call set-up, untimed
        times = common.interleaved({"inference pass": inference_pass, "forward only": forward_only,
                                    "one pattern at a time": one_at_a_time}, args.reps, warmup=0)
    patterns = {"inference pass": n, "forward only": n, "one pattern at a time": len(single)}
    rate = {k: patterns[k] / common.median(v) for k, v in times.items()}
    rows = [[name, patterns[name], common.spread(ts), common.fmt_rate(rate[name]),
             f"{rate[name] / rate['forward only']:.2f}"] for name, ts in times.items()]
    print(f"inference benchmark: cube {args.scan}x{args.scan}x{args.det}x{args.det}, tile {args.tile}, U-Net "
          f"width {args.width} depth {args.depth}, batch {B}, blend beta {args.beta}, "
          f"{torch.get_num_threads()} torch thread(s), {args.reps} passes per contender in turns; "
          "seconds as median (min-max)")
    print(common.table(["contender", "patterns", "seconds", "patterns/s", "vs forward only"], rows))
    print(f"inference pass / one pattern at a time: "
          f"{rate['inference pass'] / rate['one pattern at a time']:.2f}x the patterns/s")
    ratio = rate["inference pass"] / rate["forward only"]
    print(f"infer ratio {ratio:.2f} (goal >= {GOAL:g})")
    return 0
