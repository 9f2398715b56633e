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


@contextlib.contextmanager
def dask_bar(description: str, enable: bool = True) -> Iterator[None]:
    """A progress bar over the tasks of every dask computation inside the ``with`` block."""
    if not (enable and enabled()):
        yield
        return
    from dask.callbacks import Callback

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=None)

        class Tasks(Callback):
            def _start_state(self, dsk, state):
                progress.update(task, total=sum(len(state[k]) for k in ("ready", "waiting", "running", "finished")),
                                completed=len(state["finished"]))

            def _posttask(self, key, result, dsk, state, worker_id):
                progress.advance(task, 1)

        with Tasks():
            yield
