"""``stemdist bench NAME``: benchmarks that print figures measured side by side in one run.

Each benchmark is a module here with ``add_arguments(parser)`` and ``run(args) -> int``; its last
printed line states the headline figure against its goal.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {  # name -> (module, one-line help)
}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    names = p.add_subparsers(dest="bench", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        b = names.add_parser(name, help=help_)
        mod = importlib.import_module(f"stemdist.bench.{module}")
        mod.add_arguments(b)
        b.set_defaults(func=mod.run)


def main(args: argparse.Namespace) -> int:
    return args.func(args)
