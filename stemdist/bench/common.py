"""Helpers shared by the benchmarks: work directories, cached synthetic cubes, interleaved timing, tables."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..console import table  # noqa: F401  (the one table printer, re-exported for the benchmarks)


def shared_data() -> Path:
    """The shared SrTiO3 cubes' folder: ``$STEMDIST_SHARED_DATA``, else ``shared/data`` beside the source
    checkout, else ``../shared/data`` from the working directory (where neither exists: the first)."""
    if os.environ.get("STEMDIST_SHARED_DATA"):
        return Path(os.environ["STEMDIST_SHARED_DATA"])
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    return next((d for d in (beside, Path.cwd().parent / "shared" / "data") if d.is_dir()), beside)


def add_common(parser, smoke_help: str) -> None:
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--workdir", help="where generated cubes go (kept and reused); default: a temporary "
                                          "directory removed afterwards")
    parser.add_argument("--seed", type=int, default=0)


@contextlib.contextmanager
def workdir(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` (created, kept), or a temporary directory removed on exit."""
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def synth_cube(root: Path, scan: tuple[int, int], det: tuple[int, int], dose: float = 100.0,
               tile: int | None = None, seed: int = 0) -> Path:
    """A ``stemdist.synth`` group (``noisy``, ``truth``) under ``root``, reused when already there."""
    from ..io.synth import synth

    name = f"synth_{scan[0]}x{scan[1]}_{det[0]}x{det[1]}_d{dose:g}_t{tile}_s{seed}.zarr"
    path = root / name
    stamp = path / "bench-complete.json"
    if not stamp.exists():
        synth(path, scan, det, dose, seed=seed, tile=tile, overwrite=True)
        stamp.write_text(json.dumps({"scan": scan, "det": det, "dose": dose, "tile": tile, "seed": seed}))
    return path


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(contenders: dict[str, Callable[[], object]], reps: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every contender, measured in turns (order rotated each repetition).

    ``warmup`` untimed turns first. Running the contenders side by side means that whatever else the
    machine is doing slows them alike, so their ratios are meaningful even when absolute times are not.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(contenders[name]))
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    """``median (min-max)`` in the values' unit, for tables."""
    return f"{median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}"


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks, like ``du``)."""
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            total += p.stat().st_blocks * 512
    return total


def rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])
