"""What the user sees while a command runs: progress bars with ETA (rich) and plain-text tables.

``QUIET`` is the one quiet switch: ``--quiet`` on the command line (or ``quiet=True`` in the API) sets it,
and it turns off every progress bar (Lightning's included), console log line and summary.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

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


def quiet_libraries() -> None:
    """Silence library chatter that says nothing about the user's run (and Lightning's banners if quiet).

    Called by the CLI and again where Lightning is imported (its import resets its loggers' levels)."""
    import logging
    import warnings

    for pattern in (".*LeafSpec.*", ".*log_every_n_steps.*", ".*does not have many workers.*",
                    ".*litlogger.*", ".*predict_dataloader.*"):
        warnings.filterwarnings("ignore", pattern)
    tips = logging.Filter()
    tips.filter = lambda record: "litlogger" not in record.getMessage()
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(tips)
    if QUIET:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def fmt(value: object, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, ``None`` as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 4) -> str:
    """A plain-text table that is also Markdown: the one table printer of every command and benchmark."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c, digits) for c in row]
                                           for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
