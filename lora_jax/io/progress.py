"""Progress for loops that can run longer than a few seconds.

On a terminal (or in Jupyter) a transient ``rich`` bar is drawn. Where the
output is not a terminal (a pipe, ``tee``, a CI log) a bar would draw nothing,
so a plain line is printed instead every ``interval`` seconds and once at the
end: ``<description>: <done>/<total>, loss <latest>, <elapsed>s``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TextIO, TypeVar

T = TypeVar("T")

INTERVAL = 10.0   # seconds between two plain lines: a line in a CI log every few seconds, not every step


class _PlainLines:
    """Progress as plain lines on a stream that is not a terminal: one per ``interval`` seconds, and one at the end."""

    def __init__(self, description: str, total: int | None, completed: int, stream: TextIO,
                 clock: Callable[[], float], interval: float):
        self._description, self._total, self._completed = description.strip(), total, completed
        self._stream, self._clock, self._interval = stream, clock, interval
        self._loss: float | None = None
        self._start = self._last = clock()
        self._printed = completed   # the count the last line showed; the start needs no line

    def advance(self, loss: float | None = None, steps: int = 1) -> None:
        self._completed += steps
        self._loss = self._loss if loss is None else loss
        if self._clock() - self._last >= self._interval:
            self._line()

    def finish(self) -> None:
        if self._completed != self._printed:
            self._line()

    def print(self, message: str) -> None:
        print(message, file=self._stream, flush=True)

    def _line(self) -> None:
        now = self._clock()
        total = "" if self._total is None else f"/{self._total}"
        loss = "" if self._loss is None else f", loss {self._loss:.4f}"
        self.print(f"{self._description}: {self._completed}{total}{loss}, {now - self._start:.0f}s")
        self._last, self._printed = now, self._completed


def _live(stream: TextIO) -> bool:
    """Whether ``rich`` can draw a bar on ``stream`` (a terminal, or Jupyter), as rich itself decides."""
    from rich.console import Console   # deferred: rich costs an import only when progress is shown

    console = Console(file=stream)
    return console.is_terminal or console.is_jupyter


def progress(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None,
             stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
             interval: float = INTERVAL) -> Iterator[T]:
    """Yields ``items``, showing progress on ``stream`` (default stdout) when ``enabled``.

    A transient bar on a terminal; elsewhere a plain line every ``interval``
    seconds of ``clock`` and one at the end.

    >>> list(progress([1, 2, 3], "counting", enabled=False))
    [1, 2, 3]
    """
    if not enabled:
        yield from items
        return
    stream = sys.stdout if stream is None else stream
    if total is None and isinstance(items, Sized):
        total = len(items)
    if _live(stream):
        from rich.console import Console
        from rich.progress import track

        yield from track(items, description=description, total=total, transient=True, console=Console(file=stream))
        return
    lines = _PlainLines(description, total, 0, stream, clock, interval)
    for item in items:
        yield item
        lines.advance()
    lines.finish()


class _LossBar:
    """What :func:`loss_progress` yields on a terminal: ``advance(loss)`` moves the bar, ``print`` writes above it."""

    def __init__(self, bar, task):
        self._bar, self._task = bar, task

    def advance(self, loss: float | None = None, steps: int = 1) -> None:
        self._bar.update(self._task, advance=steps, **({} if loss is None else {"loss": f"{loss:.4f}"}))

    def print(self, message: str) -> None:
        self._bar.console.print(message)


class _NoProgress:
    """What :func:`loss_progress` yields when not ``enabled``: no progress is shown, ``print`` still writes."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def advance(self, loss: float | None = None, steps: int = 1) -> None:
        pass

    def print(self, message: str) -> None:
        print(message, file=self._stream, flush=True)


@contextlib.contextmanager
def loss_progress(total: int, description: str, *, completed: int = 0, enabled: bool = True,
                  stderr: bool = False, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                  interval: float = INTERVAL) -> Iterator[_LossBar | _PlainLines | _NoProgress]:
    """Training progress showing steps, the latest loss and the time, on ``stream`` (default stdout, or stderr).

    On a terminal, a transient bar with the time left; elsewhere a plain line
    every ``interval`` seconds of ``clock`` and one at the end. The object
    yielded has ``advance(loss=None, steps=1)`` and ``print(message)``.

    >>> with loss_progress(3, "training", enabled=False) as bar:
    ...     for loss in (2.0, 1.5, 1.2):
    ...         bar.advance(loss)
    """
    stream = (sys.stderr if stderr else sys.stdout) if stream is None else stream
    if not enabled:
        yield _NoProgress(stream)
    elif _live(stream):
        with _rich_bar(total, description, completed, stream) as bar:
            yield bar
    else:
        lines = _PlainLines(description, total, completed, stream, clock, interval)
        yield lines
        lines.finish()


@contextlib.contextmanager
def _rich_bar(total: int, description: str, completed: int, stream: TextIO) -> Iterator[_LossBar]:
    from rich.console import Console   # deferred: rich costs an import only when a bar is shown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=stream), transient=True) as bar:
        yield _LossBar(bar, bar.add_task(description, total=total, completed=completed, loss="-"))
