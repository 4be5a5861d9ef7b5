"""Progress bars (``rich``) for loops that can run longer than a few seconds."""

from __future__ import annotations

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
    from rich.progress import track

    if total is None and isinstance(items, Sized):
        total = len(items)
    yield from track(items, description=description, total=total, transient=True)
