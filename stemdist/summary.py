"""The one-screen summary printed at the end of ``stemdist denoise``."""

from __future__ import annotations

import csv
import json
import time

import zarr
from rich.console import Console
from rich.table import Table

from .cycles import RunPaths


def cycle_rows(paths: RunPaths) -> list[dict]:
    """Per cycle: epochs run, training seconds, last warm-up and Poisson losses, whether complete."""
    rows: dict[int, dict] = {}
    losses = paths.root / "logs" / "losses.csv"
    if losses.exists():
        with open(losses) as f:
            for r in csv.DictReader(f):
                row = rows.setdefault(int(r["cycle"]), {"epochs": set(), "seconds": 0.0})
                row["epochs"].add(int(r["epoch"]))
                row["seconds"] += float(r["seconds"])
                row[r["phase"]] = float(r["loss"])
    group = zarr.open_group(str(paths.denoised), mode="r")
    for name in group.array_keys():
        if name.startswith("cycle_"):
            c = int(name.split("_")[1])
            rows.setdefault(c, {"epochs": set(), "seconds": 0.0})["complete"] = bool(group[name].attrs.get("complete"))
            rows[c]["cycle_seconds"] = group[name].attrs.get("seconds")
    return [{"cycle": c, **rows[c]} for c in sorted(rows)]


def print_summary(paths: RunPaths, seconds: float | None = None) -> None:
    info = json.loads(paths.run_info.read_text())
    console = Console()
    table = Table(title=f"stemdist run {paths.root}", title_justify="left")
    for col in ("cycle", "epochs", "train s", "cycle s", "warm-up loss", "Poisson loss", "cube"):
        table.add_column(col, justify="right")
    for r in cycle_rows(paths):
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        table.add_row(str(r["cycle"]), str(len(r["epochs"])), f"{r['seconds']:.1f}", fmt(r.get("cycle_seconds")),
                      fmt(r.get("warmup")), fmt(r.get("poisson")),
                      "complete" if r.get("complete") else ("removed" if "complete" not in r else "partial"))
    console.print(table)
    console.print(f"input   {info['input']}  shape {tuple(info['shape'])} {info['dtype']}")
    console.print(f"final   {paths.final}")
    console.print(f"weights {paths.weights}")
    console.print(f"figures {paths.figure}, {paths.root / 'report'}")
    if seconds is not None:
        console.print(f"done in {time.strftime('%H:%M:%S', time.gmtime(seconds))}")
