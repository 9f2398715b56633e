"""One place for what a run directory holds: paths, array names, the ``complete`` mark, the loss log.

Every stage that writes or reads a run (the pipeline, ``info``, ``export``, ``evaluate``, ``predict``,
the figures and the summary) goes through this module, never through literal file names.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DENOISED = "denoised.zarr"
FINAL = "final"
RUN_INFO = "run.json"
CONFIG = "config.yaml"
REPORT = "report"
LOSSES = "losses.csv"
LOSS_COLUMNS = ("cycle", "epoch", "phase", "loss", "seconds")
COMPLETE = "complete"  # attribute set on an array once every chunk of it is written


def cycle_name(c: int) -> str:
    return f"cycle_{c:02d}"


def cycle_number(name: str) -> int | None:
    """``cycle_03`` -> 3; anything else -> None."""
    head, _, num = name.partition("_")
    return int(num) if head == "cycle" and num.isdigit() else None


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs go."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, root: str | Path) -> RunPaths:
        return cls(Path(root).resolve())

    @property
    def denoised(self) -> Path:
        return self.root / DENOISED

    def cycle(self, c: int) -> Path:
        return self.denoised / cycle_name(c)

    @property
    def final(self) -> Path:
        return self.denoised / FINAL

    @property
    def weights(self) -> Path:
        return self.root / "unet_denoiser.pt"

    def cycle_weights(self, c: int) -> Path:
        return self.root / "weights" / f"{cycle_name(c)}.pt"

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO

    @property
    def figure(self) -> Path:
        return self.root / "denoised.png"

    @property
    def input(self) -> Path:
        return self.root / "input.zarr"

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def raw_bf(self) -> Path:
        return self.report / "raw_bf.npy"

    @property
    def bf_mask(self) -> Path:
        return self.report / "bf_mask.npy"

    @property
    def metrics(self) -> Path:
        return self.report / "metrics.json"

    @property
    def log_file(self) -> Path:
        return self.root / "stemdist.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def losses(self) -> Path:
        return self.logs / LOSSES

    def checkpoints(self, c: int) -> Path:
        return self.root / "checkpoints" / cycle_name(c)

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def is_run(self) -> bool:
        return self.run_info.exists()

    def read_info(self) -> dict[str, Any]:
        return json.loads(self.run_info.read_text())


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_INFO).exists()


def mark_complete(arr, **extra: Any) -> None:
    """Set ``complete: true`` (and ``extra``) on a Zarr array once all of its chunks are written."""
    arr.attrs.update({COMPLETE: True, **extra})


def is_complete(arr) -> bool:
    return bool(arr.attrs.get(COMPLETE, False))


def append_loss(path: Path, row: dict[str, Any]) -> None:
    """One epoch's row of the loss log (kept across resumes)."""
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write(",".join(LOSS_COLUMNS) + "\n")
        f.write(",".join(str(row[c]) for c in LOSS_COLUMNS) + "\n")


def read_losses(root: str | Path) -> list[dict]:
    """Epoch losses of every cycle, one dict per (cycle, epoch): cycle, epoch, phase, loss, seconds.

    From ``logs/losses.csv`` (a resumed epoch replaces the earlier row), or for runs of earlier versions
    from Lightning's ``logs/cycle_XX/[resumed_N/]metrics.csv``.
    """
    paths = RunPaths(Path(root))
    found: dict[tuple[int, int], dict] = {}
    if paths.losses.exists():
        with open(paths.losses, newline="") as fh:
            for row in csv.DictReader(fh):
                c, e = int(row["cycle"]), int(row["epoch"])
                found[(c, e)] = {"cycle": c, "epoch": e, "phase": row.get("phase") or "poisson",
                                 "loss": float(row["loss"]), "seconds": float(row.get("seconds") or 0.0)}
        return [found[k] for k in sorted(found)]
    for csv_path in sorted(paths.logs.glob("cycle_*/**/metrics.csv")):
        cycle = cycle_number(csv_path.relative_to(paths.logs).parts[0])
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("loss_epoch"):
                    e = int(float(row["epoch"]))
                    warm = bool(float(row["warmup"])) if row.get("warmup") else False
                    found[(cycle, e)] = {"cycle": cycle, "epoch": e, "phase": "warmup" if warm else "poisson",
                                         "loss": float(row["loss_epoch"]), "seconds": 0.0}
    return [found[k] for k in sorted(found)]
