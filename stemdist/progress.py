"""Progress bars with ETA for long steps (rich), quiet under ``--quiet`` or when not on a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

QUIET = False


def enabled() -> bool:
    return not QUIET and sys.stderr.isatty()


@contextlib.contextmanager
def bar(description: str, total: int | None, enable: bool = True) -> Iterator[Callable[[int], None]]:
    """``with bar("inference", n) as advance: ... advance(1)``."""
    if not (enable and enabled()):
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
