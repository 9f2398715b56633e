"""``stemdist bench NAME``: benchmarks that print figures measured side by side in one run.

The command line declares ``stemdist bench NAME [ARGS]`` (``stemdist.cli``); each benchmark is a module
here with ``add_arguments(parser)`` and ``run(args) -> int``; its last
printed line states the headline figure against its goal.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {  # name -> (module, one-line help)
    "quality": ("quality", "the default configuration vs Gaussian, 8-neighbour mean and PCA baselines "
                           "(PSNR, virtual BF/ADF/CoM errors) against the truth"),
    "loader": ("loader", "Zarr tile loader vs the reference's in-memory per-sample gather (samples/s)"),
    "infer": ("infer", "inference pass (read, predict, write) vs forward passes alone, and per pattern"),
    "train": ("train", "training samples/s per device and the fraction of step time waiting for data"),
    "gpu": ("gpu", "the GPU path in one call: bf16/compile/torchrun checks, training and inference speed per "
                   "detector size against the bf16 ceiling, loader decode rate (--smoke: CPU form)"),
    "downstream": ("downstream", "other packages' analyses (HyperSpy virtual BF/ADF; py4DSTEM CoM, DPC and "
                                 "ptychography) on raw, Gaussian, PCA and stemdist cubes, scored against the truth's"),
    "materials": ("materials", "simulate (abTEM, once, cached) the cubes of other crystals and scan steps that "
                               "`bench quality --materials` scores on"),
    "fusion": ("fuse", "the final cube's fusion with the raw counts: the plan's seconds and the write's "
                       "patterns/s per detector size"),
    "memory": ("memory", "peak RSS of `stemdist denoise` on synthetic cubes of growing size (GBs on disk)"),
}


def main(args: argparse.Namespace) -> int:
    module, help_ = BENCHMARKS[args.name]
    mod = importlib.import_module(f"stemdist.bench.{module}")
    parser = argparse.ArgumentParser(prog=f"stemdist bench {args.name}", description=help_)
    mod.add_arguments(parser)
    return mod.run(parser.parse_args(args.args))
