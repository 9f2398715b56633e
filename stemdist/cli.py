"""The ``stemdist`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any

from . import config as cfg
from .errors import StemdistError

# Subcommands defined in their own modules (each has ``add_parser(subparsers)``).
EXTRA_COMMANDS = (
    "bench",
    "predict",
    "evaluate",
    "info",
)

SHORTCUTS = {  # CLI flag / API keyword -> config key
    "cycles": "train.cycles",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "accelerator": "hardware.accelerator",
    "devices": "hardware.devices",
    "num_nodes": "hardware.num_nodes",
}


def shortcut_overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, key in SHORTCUTS.items():
        if values.get(name) is not None:
            section, k = key.split(".")
            out.setdefault(section, {})[k] = values[name]
    return out


def merge(*updates: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for u in updates:
        for section, values in u.items():
            out.setdefault(section, {}).update(values or {})
    return out


def cmd_convert(a: argparse.Namespace) -> int:
    from .storage import convert

    arr = convert(a.input, a.output, dataset=a.dataset, tile=a.tile, overwrite=a.overwrite)
    print(f"wrote {a.output}: shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from .synth import synth

    synth(a.output, tuple(a.scan), tuple(a.det), a.dose, seed=a.seed, tile=a.tile, overwrite=a.overwrite)
    print(f"wrote {a.output} (arrays: noisy, truth)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .exporters import export

    export(a.input, a.output, dataset=a.dataset, overwrite=a.overwrite)
    print(f"wrote {a.output}")
    return 0


def _run_denoise(a: argparse.Namespace, argv: list[str]) -> int:
    from . import distributed
    from .api import run_denoise

    overrides = merge(cfg.parse_overrides(a.set or []), shortcut_overrides(vars(a)))
    config = cfg.load(a.config, overrides)  # validated before any work
    ranks = distributed.detect()
    nproc = config.hardware.devices
    if ranks.launcher == "none" and (nproc > 1 or config.hardware.num_nodes > 1):
        if config.hardware.num_nodes > 1:
            raise cfg.ConfigError("hardware.num_nodes > 1: start the run on every node with torchrun or srun "
                                  "(see launch/ and the README)")
        return distributed.relaunch(nproc, argv)
    t0 = time.perf_counter()
    if a.quiet:
        logging.getLogger("stemdist.console").disabled = True
    paths = run_denoise(a.input, a.out, config, dataset=a.dataset, reference=a.reference, resume=a.resume,
                        overrides=overrides, ranks=ranks, config_file=a.config)
    if ranks.is_main and not a.quiet:
        from .summary import print_summary

        print_summary(paths, time.perf_counter() - t0)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .api import demo

    demo(a.out, quiet=a.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stemdist", description="Self-supervised denoising of 4D-STEM cubes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summaries")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def sub_add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kw)

    sub.add_parser = sub_add_parser  # every subcommand takes --quiet

    s = sub.add_parser("convert", help="convert .npy/.npz/HDF5 (or Zarr) into a chunked Zarr cube")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--dataset", help="array/dataset name inside an .npz, HDF5 file or Zarr group")
    s.add_argument("--tile", type=int, help="scan tile (chunk) edge; default: ~4 MB chunks")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("denoise", help="train and denoise a cube over refinement cycles")
    s.add_argument("input", help="Zarr cube, or any file `convert` reads")
    s.add_argument("--out", required=True, help="run directory (new, or existing with --resume)")
    s.add_argument("--config", help="YAML file or built-in name: default, reference, smoke")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config key")
    s.add_argument("--cycles", type=int)
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int, dest="batch_size", help="per device")
    s.add_argument("--accelerator", choices=["cpu", "gpu", "auto"])
    s.add_argument("--devices", type=int, help="devices per node (several: DDP)")
    s.add_argument("--num-nodes", type=int, dest="num_nodes")
    s.add_argument("--dataset", help="array name inside the input file or Zarr group")
    s.add_argument("--reference", help="high-dose cube for the figure only (never used for training)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.set_defaults(func=None)

    s = sub.add_parser("synth", help="write a synthetic cube with known truth (group: noisy, truth)")
    s.add_argument("output")
    s.add_argument("--scan", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    s.add_argument("--det", type=int, nargs=2, default=[32, 32], metavar=("P", "Q"))
    s.add_argument("--dose", type=float, default=100.0, help="electrons per pattern")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tile", type=int)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("export", help="write a Zarr cube or a run's result to .npy, py4DSTEM .h5/.emd or "
                       "HyperSpy .hspy (streamed)")
    s.add_argument("input", help="Zarr cube, or a run directory (its final denoised cube)")
    s.add_argument("output", help="format by suffix: .npy, .h5/.hdf5/.emd (py4DSTEM DataCube), "
                   ".hspy (HyperSpy)")
    s.add_argument("--dataset", help="array in a Zarr group (for a run directory: default final)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="denoise a synthetic cube with the smoke configuration")
    s.add_argument("--out", default="stemdist-demo")
    s.set_defaults(func=cmd_demo)

    for name in EXTRA_COMMANDS:  # modules with add_parser(sub) that set args.func
        importlib.import_module(f"stemdist.{name}").add_parser(sub)
    return p


def quiet_libraries(quiet: bool) -> None:
    """Silence library chatter that says nothing about the user's run (and Lightning's banners if quiet)."""
    import logging
    import warnings

    for pattern in (".*LeafSpec.*", ".*log_every_n_steps.*", ".*does not have many workers.*",
                    ".*litlogger.*", ".*predict_dataloader.*"):
        warnings.filterwarnings("ignore", pattern)
    tips = logging.Filter()
    tips.filter = lambda record: "litlogger" not in record.getMessage()
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(tips)
    if quiet:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from . import progress

    progress.QUIET = args.quiet
    quiet_libraries(args.quiet)
    args.argv = argv  # for a self-launch under torchrun
    try:
        if args.command == "denoise":
            return _run_denoise(args, argv)
        return args.func(args)
    except StemdistError as exc:
        from .distributed import detect

        if detect().is_main:  # every rank meets the same error; one line is enough
            print(f"stemdist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stemdist: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
