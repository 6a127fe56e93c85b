"""Progress reporting: experiments call `progress.task(description, total)` and advance the returned
handle; the CLI shows rich progress bars, the Python API shows nothing unless asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


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
