"""Progress reporting: experiments call `progress.task(description, total)` and advance the returned
handle; the CLI shows rich progress bars on a terminal and plain lines otherwise (nohup, SLURM, CI logs),
the Python API shows nothing unless asked."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Protocol


class Progress(Protocol):
    """Something that shows how far long work has got."""

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Start a task of `total` steps; the returned function advances it."""
        ...

    def note(self, message: str) -> None:
        """A one-off message (e.g. 'dequantizing the model once')."""
        ...


class Silent:
    """Shows nothing."""

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A task that shows nothing."""
        return lambda steps=1: None

    def note(self, message: str) -> None:
        """Ignored."""


class RichProgress:
    """rich progress bars on stderr, with elapsed and remaining time."""

    def __init__(self, progress: object) -> None:
        self._progress = progress

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A new bar."""
        task_id = self._progress.add_task(description, total=total)  # type: ignore[attr-defined]
        return lambda steps=1: self._progress.advance(task_id, steps)  # type: ignore[attr-defined]

    def note(self, message: str) -> None:
        """Printed above the bars."""
        self._progress.console.print(message)  # type: ignore[attr-defined]


class PlainProgress:
    """Plain lines for a log: a task's start, then a line per step, except that a task of many steps
    writes one only when it crosses a tenth of its total or `every` seconds have passed, and its end.
    (A live bar prints nothing until the end when its output is not a terminal.)"""

    def __init__(
        self, stream: IO[str] | None = None, every: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._every = every
        self._clock = clock

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr
        print(line, file=stream, flush=True)

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A task whose progress is written as lines `description: done/total (pct%) elapsed`."""
        start = self._clock()
        state = {"done": 0, "tenth": 0, "written": start}
        self._write(f"{description}: 0/{total}")

        def advance(steps: int = 1) -> None:
            state["done"] += steps
            now = self._clock()
            done = state["done"]
            tenth = done * 10 // total if total > 0 else 10
            if done >= total or tenth > state["tenth"] or now - state["written"] >= self._every:
                state["tenth"], state["written"] = tenth, now
                percent = f" ({100 * done / total:.0f}%)" if total > 0 else ""
                self._write(f"{description}: {done}/{total}{percent} {now - start:.1f} s")

        return advance

    def note(self, message: str) -> None:
        """Written as a line."""
        self._write(message)


def is_terminal() -> bool:
    """Whether both stdout and stderr are terminals (live bars can be drawn)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


@contextmanager
def cli_progress() -> Iterator[RichProgress | PlainProgress]:
    """Live bars on a terminal; plain lines on stderr when stdout or stderr is not one (a pipe, a file)."""
    if not is_terminal():
        yield PlainProgress()
        return
    with rich_progress() as bars:
        yield bars


@contextmanager
def rich_progress() -> Iterator[RichProgress]:
    """A live set of progress bars on stderr for the duration of the block."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichBars,
    )

    bars = RichBars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with bars:
        yield RichProgress(bars)
