"""Fault injection for the fault tests: ``STEMDIST_FAULT=NAME`` kills this process (SIGKILL, as ``kill -9``)
when it reaches the point ``NAME`` (``train:CYCLE:EPOCH``, ``infer:TILE``, ``final:CHUNK``, ``convert``); with
``STEMDIST_FAULT_RANK=R`` only rank ``R`` does."""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    rank = os.environ.get("STEMDIST_FAULT_RANK")
    if os.environ.get("STEMDIST_FAULT") == name and (rank is None or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
