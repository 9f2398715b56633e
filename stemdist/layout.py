"""One place for what a run directory holds: paths, array names, the ``complete`` mark, the loss log.

Every stage that writes or reads a run (the pipeline, ``info``, ``export``, ``evaluate``, ``predict``,
the figures and the summary) goes through this module, never through literal file names.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

DENOISED = "denoised.zarr"
FINAL = "final"
RUN_INFO = "run.json"
CONFIG = "config.yaml"
REPORT = "report"
LOSSES = "losses.csv"
LEFTOVERS = {"input.zarr", "input.zarr.partial", REPORT, ".lock", CONFIG, DENOISED}  # an interrupted set-up
LOSS_COLUMNS = ("cycle", "epoch", "phase", "loss", "seconds", "grad_norm", "heldout", "member")
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
    def mean_pattern(self) -> Path:
        return self.report / "mean_pattern.npy"

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

    def checkpoints(self, c: int, member: int = 0) -> Path:
        """Cycle ``c``'s checkpoint folder; ensemble member ``k`` > 0 (``train.ensemble``) has its own inside."""
        return self.root / "checkpoints" / cycle_name(c) / member_name(member)

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def is_run(self) -> bool:
        return self.run_info.exists()

    def read_info(self) -> dict[str, Any]:
        return json.loads(self.run_info.read_text())


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_INFO).exists()


def require_complete(arr, name: str) -> None:
    """Refuse a stemdist array whose chunks were not all written: created ``complete: false`` (or, for runs of
    earlier versions, inside a run's ``denoised.zarr`` without the mark)."""
    attrs = arr.attrs
    inside_run = DENOISED in Path(name).parts
    if attrs.get(COMPLETE) is False or (inside_run and not attrs.get(COMPLETE, False)):
        raise InputError(f"{name}: incomplete - not all of its chunks were written (an interrupted run; finish it "
                    "with `stemdist denoise ... --resume`, `stemdist info` shows what is complete)")


def mark_complete(arr, **extra: Any) -> None:
    """Set ``complete: true`` (and ``extra``) on a Zarr array once all of its chunks are written."""
    arr.attrs.update({COMPLETE: True, **extra})


def is_complete(arr) -> bool:
    return bool(arr.attrs.get(COMPLETE, False))


def append_loss(path: Path, row: dict[str, Any]) -> None:
    """One epoch's row of the loss log (kept across resumes; a log begun by an earlier version keeps its columns)."""
    columns = LOSS_COLUMNS
    if path.exists():
        with open(path) as f:
            columns = tuple(f.readline().strip().split(","))
    with open(path, "a") as f:
        if not path.stat().st_size:
            f.write(",".join(columns) + "\n")
        f.write(",".join(str(row.get(c, "")) for c in columns) + "\n")


def member_name(member: int) -> str:
    """The folder (under a cycle's checkpoints or logs) of ``train.ensemble`` member ``member``; "" for the first,
    whose files stay where a run of one network keeps them."""
    return f"member_{member}" if member else ""


def read_losses(root: str | Path) -> list[dict]:
    """Epoch losses of every cycle, one dict per (cycle, member, epoch): cycle, epoch, phase, loss, seconds,
    grad_norm (the epoch's largest gradient norm before clipping), heldout (the Poisson loss on held-out
    positions, ``train.holdout``; NaN where not logged) and member (the ``train.ensemble`` network, 0 for one).

    From ``logs/losses.csv`` (a resumed epoch replaces the earlier row), or for runs of earlier versions
    from Lightning's ``logs/cycle_XX/[resumed_N/]metrics.csv``.
    """
    paths = RunPaths(Path(root))
    found: dict[tuple[int, int, int], dict] = {}
    if paths.losses.exists():
        with open(paths.losses, newline="") as fh:
            for row in csv.DictReader(fh):
                c, e, m = int(row["cycle"]), int(row["epoch"]), int(row.get("member") or 0)
                found[(c, m, e)] = {"cycle": c, "member": m, "epoch": e, "phase": row.get("phase") or "poisson",
                                    "loss": float(row["loss"]), "seconds": float(row.get("seconds") or 0.0),
                                    "grad_norm": float(row.get("grad_norm") or "nan"),
                                    "heldout": float(row.get("heldout") or "nan")}
        return [found[k] for k in sorted(found)]
    for csv_path in sorted(paths.logs.glob("cycle_*/**/metrics.csv")):
        cycle = cycle_number(csv_path.relative_to(paths.logs).parts[0])
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("loss_epoch"):
                    e = int(float(row["epoch"]))
                    warm = bool(float(row["warmup"])) if row.get("warmup") else False
                    found[(cycle, 0, e)] = {"cycle": cycle, "member": 0, "epoch": e,
                                            "phase": "warmup" if warm else "poisson",
                                            "loss": float(row["loss_epoch"]), "seconds": 0.0,
                                            "grad_norm": math.nan, "heldout": math.nan}
    return [found[k] for k in sorted(found)]


class RunLock:
    """One run per RUN_DIR: ``RUN_DIR/.lock`` holds the host, PID and start time of the run that owns it.

    A second run meets the lock and stops with one line naming its owner; a lock left by a process that no
    longer runs on this host (kill -9, a crash) is taken over. Released when the run ends.
    """

    def __init__(self, paths: RunPaths):
        self.path = paths.lock
        self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written this instant, or torn: look again
                    time.sleep(0.2)
                    owner = self._owner()
                if owner and (owner.get("host") != me["host"] or self._alive(int(owner.get("pid", -1)))):
                    raise InputError(f"{self.path.parent} is in use by another stemdist run (host {owner.get('host')}, "
                                f"PID {owner.get('pid')}, started {owner.get('started')}); wait for it to end, or "
                                f"delete {self.path} if that run is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OSError(errno.EBUSY, "could not take the run lock", str(self.path))

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
