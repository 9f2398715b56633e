"""The one-screen summary printed at the end of ``stemdist denoise``."""

from __future__ import annotations

import time

import zarr

from ..console import fmt, table
from ..layout import RunPaths, cycle_number, is_complete, read_losses


def cycle_rows(paths: RunPaths) -> list[dict]:
    """Per cycle: epochs run, training seconds, last warm-up and Poisson losses, whether complete."""
    rows: dict[int, dict] = {}
    for r in read_losses(paths.root):
        row = rows.setdefault(r["cycle"], {"epochs": set(), "seconds": 0.0})
        row["epochs"].add(r["epoch"])
        row["seconds"] += r["seconds"]
        row[r["phase"]] = r["loss"]
    group = zarr.open_group(str(paths.denoised), mode="r")
    for name in group.array_keys():
        c = cycle_number(name)
        if c is not None:
            row = rows.setdefault(c, {"epochs": set(), "seconds": 0.0})
            row["complete"] = is_complete(group[name])
            row["cycle_seconds"] = group[name].attrs.get("seconds")
    return [{"cycle": c, **rows[c]} for c in sorted(rows)]


def print_summary(paths: RunPaths, seconds: float | None = None) -> None:
    info = paths.read_info()
    state = lambda r: "complete" if r.get("complete") else ("removed" if "complete" not in r else "partial")  # noqa: E731
    rows = [[r["cycle"], len(r["epochs"]), f"{r['seconds']:.1f}", fmt(r.get("cycle_seconds")), fmt(r.get("warmup")),
             fmt(r.get("poisson")), state(r)] for r in cycle_rows(paths)]
    print(f"stemdist run {paths.root}")
    print(table(["cycle", "epochs", "train s", "cycle s", "warm-up loss", "Poisson loss", "cube"], rows))
    print(f"input   {info['input']}  shape {tuple(info['shape'])} {info['dtype']}")
    print(f"final   {paths.final}")
    print(f"weights {paths.weights}")
    print(f"figures {paths.figure}, {paths.report}")
    if seconds is not None:
        print(f"done in {time.strftime('%H:%M:%S', time.gmtime(seconds))}")
