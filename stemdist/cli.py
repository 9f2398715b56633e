"""The ``stemdist`` command line: every subcommand is declared here, and imports its stage only when it runs.

Errors the user can fix print one line and exit with status 2; ``--debug`` (or ``STEMDIST_DEBUG=1``)
shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import StemdistError

SAMPLES = 8  # chunks `info` reads for its count statistics


# ------------------------------------------------------------------------------------------ commands
def cmd_convert(a: argparse.Namespace) -> int:
    from .io.convert import convert

    arr = convert(a.input, a.output, dataset=a.dataset, tile=a.tile, overwrite=a.overwrite, scan_shape=a.scan_shape)
    print(f"wrote {a.output}: shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}")
    return 0


def cmd_denoise(a: argparse.Namespace) -> int:
    from . import config as cfg
    from .run import ranks as rk

    overrides = cfg.merge(cfg.parse_overrides(a.set or []), cfg.shortcut_overrides(vars(a)))
    config = cfg.load(a.config, overrides)  # validated before any work
    ranks = rk.detect()
    if ranks.launcher == "none" and (config.hardware.devices > 1 or config.hardware.num_nodes > 1):
        if config.hardware.num_nodes > 1:
            raise cfg.ConfigError("hardware.num_nodes > 1: start the run on every node with torchrun or srun "
                                  "(see launch/ and the README)")
        return rk.relaunch(config.hardware.devices, a.argv, a.debug)
    if ranks.launcher == "torchrun":
        rk.die_with_parent()
    from .api import run_denoise

    t0 = time.perf_counter()
    paths = run_denoise(a.input, a.out, config, dataset=a.dataset, reference=a.reference, resume=a.resume,
                        overrides=overrides, ranks=ranks)
    if ranks.is_main and not a.quiet:
        from .run.summary import print_summary

        print_summary(paths, time.perf_counter() - t0)
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .run import ranks as rk

    ranks = rk.detect()
    if ranks.launcher == "none" and a.devices and a.devices > 1:
        return rk.relaunch(a.devices, a.argv, a.debug)
    if ranks.launcher == "torchrun":
        rk.die_with_parent()
    from .run.predict import predict

    out = predict(a.weights, a.input, a.output, dataset=a.dataset, batch_size=a.batch_size,
                  accelerator=a.accelerator, ranks=ranks)
    if ranks.is_main and not a.quiet:
        print(f"wrote {out}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from .io.synth import synth

    synth(a.output, tuple(a.scan), tuple(a.det), a.dose, seed=a.seed, tile=a.tile, overwrite=a.overwrite)
    print(f"wrote {a.output} (arrays: noisy, truth)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .io.export import export

    export(a.input, a.output, dataset=a.dataset, overwrite=a.overwrite)
    print(f"wrote {a.output}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import json

    from .io.info import describe, format_info

    info = describe(a.path, dataset=a.dataset, samples=a.samples)
    print(json.dumps(info, indent=2, default=str) if a.json else format_info(info))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .console import dask_bar
    from .layout import RunPaths
    from .quality.evaluate import evaluate, summary_lines, table

    with dask_bar("evaluate"):
        result = evaluate(a.run_dir, a.truth, a.reference, with_baselines=a.baselines,
                          truth_dataset=a.truth_dataset, truth_scale=a.truth_scale,
                          reference_dataset=a.reference_dataset, sigmas=a.sigmas, pca_rank=a.pca_rank,
                          center=tuple(a.center) if a.center else None, bf_radius=a.bf_radius,
                          adf_inner=a.adf_inner, adf_outer=a.adf_outer, threshold=a.threshold)
    if not a.quiet:
        m = result["masks"]
        print(f"masks: centre ({m['center'][0]:.1f}, {m['center'][1]:.1f}), BF radius {m['bf_radius']:.1f} px, "
              f"ADF {m['adf_inner']:.1f}-{m['adf_outer']:.1f} px")
        if result["methods"] is None:
            print("no truth or reference: figures only (give --truth or --reference for metrics)")
        else:
            print(f"against the {result['against']} ({result['truth']['path']}), data range L = "
                  f"{result['data_range']:.4g}")
            print(table(result["methods"]))
            for line in summary_lines(result):
                print(line)
        print(f"wrote {RunPaths(a.run_dir).metrics} and {len(result.get('figures', []))} figures")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .api import demo

    demo(a.out, quiet=a.quiet)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main

    return main(a)


# ------------------------------------------------------------------------------------------- parsers
def _convert(s: argparse.ArgumentParser) -> None:
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--dataset", help="array/dataset name inside an .npz, HDF5 file or Zarr group")
    s.add_argument("--tile", type=int, help="scan tile (chunk) edge; default: chunks of ~2 MB as float32")
    s.add_argument("--scan-shape", type=int, nargs=2, metavar=("H", "W"),
                   help="a series of frames without a scan shape (Merlin .mib, a flat stack): H rows of W "
                        "positions, in raster order; H x W must equal the frame count")
    s.add_argument("--overwrite", action="store_true")


def _denoise(s: argparse.ArgumentParser) -> None:
    s.add_argument("input", help="Zarr cube, or any file `convert` reads")
    s.add_argument("--out", required=True, help="run directory (new, or existing with --resume)")
    s.add_argument("--config", help="YAML file or built-in name: default, reference, smoke")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config key")
    s.add_argument("--cycles", type=int)
    s.add_argument("--epochs", type=int, help="epochs per cycle, exactly (train.min_samples off)")
    s.add_argument("--batch-size", type=int, dest="batch_size", help="per device")
    s.add_argument("--accelerator", choices=["cpu", "gpu", "auto"])
    s.add_argument("--devices", type=int, help="devices per node (several: DDP)")
    s.add_argument("--num-nodes", type=int, dest="num_nodes")
    s.add_argument("--dataset", help="array name inside the input file or Zarr group")
    s.add_argument("--reference", help="high-dose cube for the figure only (never used for training)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")


def _predict(s: argparse.ArgumentParser) -> None:
    s.add_argument("weights", help="run directory or unet_denoiser.pt (with config.yaml beside it)")
    s.add_argument("input", help="Zarr cube (array, or group with --dataset)")
    s.add_argument("output", help="new Zarr array for the denoised cube")
    s.add_argument("--dataset")
    s.add_argument("--batch-size", type=int, dest="batch_size")
    s.add_argument("--accelerator", choices=["cpu", "gpu", "auto"])
    s.add_argument("--devices", type=int, help="processes on this node (several: distributed inference)")


def _synth(s: argparse.ArgumentParser) -> None:
    s.add_argument("output")
    s.add_argument("--scan", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    s.add_argument("--det", type=int, nargs=2, default=[32, 32], metavar=("P", "Q"))
    s.add_argument("--dose", type=float, default=100.0, help="electrons per pattern")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tile", type=int)
    s.add_argument("--overwrite", action="store_true")


def _export(s: argparse.ArgumentParser) -> None:
    s.add_argument("input", help="Zarr cube, or a run directory (its final denoised cube)")
    s.add_argument("output", help="format by suffix: .npy, .h5/.hdf5/.emd (py4DSTEM DataCube), .hspy (HyperSpy)")
    s.add_argument("--dataset", help="array in a Zarr group (for a run directory: default final)")
    s.add_argument("--overwrite", action="store_true")


def _info(s: argparse.ArgumentParser) -> None:
    s.add_argument("path", help="Zarr cube or group, input file (.mib, .h5, ...), or run directory")
    s.add_argument("--dataset", help="one array of a Zarr group / one dataset of an input file")
    s.add_argument("--samples", type=int, default=SAMPLES,
                   help=f"chunks read for the count statistics (default {SAMPLES})")
    s.add_argument("--json", action="store_true", help="print the description as JSON")


def _evaluate(s: argparse.ArgumentParser) -> None:
    s.add_argument("run_dir", help="a denoise run directory")
    s.add_argument("--truth", help="noise-free cube (expected counts) with the raw cube's shape")
    s.add_argument("--truth-dataset", help="array name inside the truth file or Zarr group")
    s.add_argument("--truth-scale", type=float, default=1.0,
                   help="multiply the truth by this (e.g. the dose, for patterns normalised to sum 1)")
    s.add_argument("--reference", help="high-dose acquisition, scaled to the raw cube's counts (lacking a truth)")
    s.add_argument("--reference-dataset")
    s.add_argument("--baselines", action="store_true",
                   help="also score the classical ladder: scan Gaussians (--sigmas and the SURE width), the "
                        "8-neighbour mean, PCA, and PCA followed by the SURE-width Gaussian")
    s.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0],
                   help="widths of the scan Gaussian baselines, in probe positions")
    s.add_argument("--pca-rank", type=int, default=8, help="PCA baseline rank")
    s.add_argument("--center", type=float, nargs=2, metavar=("Y", "X"), help="disk centre, detector pixels")
    s.add_argument("--bf-radius", type=float, help="bright-field disk radius, pixels (default: from the data)")
    s.add_argument("--adf-inner", type=float, help="ADF inner radius (default 1.2 x BF radius)")
    s.add_argument("--adf-outer", type=float, help="ADF outer radius (default 3 x BF radius)")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="BF disk: pixels of the mean pattern above this fraction of its maximum")


def _demo(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="stemdist-demo", help="the demo's own folder (replaced on every run)")


def _bench(s: argparse.ArgumentParser) -> None:
    from .bench import BENCHMARKS

    s.description = "\n".join(f"{n}: {h}" for n, (_, h) in BENCHMARKS.items())
    s.formatter_class = argparse.RawDescriptionHelpFormatter
    s.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    s.add_argument("args", nargs=argparse.REMAINDER, help="its options (stemdist bench NAME --help)")


COMMANDS = {  # name -> (arguments, handler, help): the one list of subcommands
    "convert": (_convert, cmd_convert, "convert .npy/.npz/HDF5/detector files (or Zarr) into a chunked Zarr cube"),
    "denoise": (_denoise, cmd_denoise, "train and denoise a cube over refinement cycles"),
    "predict": (_predict, cmd_predict, "denoise a cube with trained weights (one inference pass)"),
    "evaluate": (_evaluate, cmd_evaluate, "metrics and figures of a run against a truth or high-dose reference"),
    "info": (_info, cmd_info, "shape, chunks, codec, size and dose of a cube, file or run directory"),
    "export": (_export, cmd_export, "write a Zarr cube or a run's result to .npy, py4DSTEM .h5/.emd or "
                                    "HyperSpy .hspy (streamed)"),
    "synth": (_synth, cmd_synth, "write a synthetic cube with known truth (group: noisy, truth)"),
    "demo": (_demo, cmd_demo, "denoise a synthetic cube with the smoke configuration"),
    "bench": (_bench, cmd_bench, "benchmarks: quality, loader, infer, train, memory, gpu"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stemdist", description="Self-supervised denoising of 4D-STEM cubes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars, log lines or summaries")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (STEMDIST_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (arguments, handler, help_) in COMMANDS.items():
        s = sub.add_parser(name, parents=[common], help=help_)
        arguments(s)
        s.set_defaults(func=handler)
    return p


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return " ".join(str(exc).split())


def _is_main_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .memory import return_freed_memory

    return_freed_memory()  # before anything large is allocated (see there)
    args = build_parser().parse_args(argv)
    from . import console

    console.QUIET = args.quiet
    debug = args.debug or os.environ.get("STEMDIST_DEBUG", "") not in ("", "0")
    console.quiet_libraries()
    args.argv = argv  # for a self-launch under torchrun
    try:
        return args.func(args)
    except (StemdistError, OSError) as exc:  # OSError: a path that cannot be written, a full disk, ...
        if debug:
            raise
        if _is_main_rank():  # every rank meets the same error; one line is enough
            print(f"stemdist: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stemdist: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
