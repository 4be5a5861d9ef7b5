"""Progress bars (``rich``) for loops that can run longer than a few seconds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Yields ``items``, drawing a transient progress bar on the terminal when ``enabled``.

    >>> list(progress([1, 2, 3], "counting", enabled=False))
    [1, 2, 3]
    """
    if not enabled:
        yield from items
        return
    from rich.progress import track   # deferred: rich costs an import only when a bar is shown

    if total is None and isinstance(items, Sized):
        total = len(items)
    yield from track(items, description=description, total=total, transient=True)


class _LossBar:
    """What :func:`loss_progress` yields: ``advance(loss)`` moves the bar, ``print`` writes above it."""

    def __init__(self, bar, task):
        self._bar, self._task = bar, task

    def advance(self, loss: float | None = None, steps: int = 1) -> None:
        self._bar.update(self._task, advance=steps, **({} if loss is None else {"loss": f"{loss:.4f}"}))

    def print(self, message: str) -> None:
        self._bar.console.print(message)


@contextlib.contextmanager
def loss_progress(total: int, description: str, *, completed: int = 0, enabled: bool = True,
                  stderr: bool = False) -> Iterator[_LossBar]:
    """A transient training bar showing steps, the latest loss and the time left.

    >>> with loss_progress(3, "training", enabled=False) as bar:
    ...     for loss in (2.0, 1.5, 1.2):
    ...         bar.advance(loss)
    """
    from rich.console import Console   # deferred: rich costs an import only when a bar is shown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=stderr), transient=True, disable=not enabled) as bar:
        yield _LossBar(bar, bar.add_task(description, total=total, completed=completed, loss="-"))
