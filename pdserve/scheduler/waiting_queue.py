"""A waiting queue ordered by priority, first come first served within a priority.

The one place that defines what `priority` means (GenerateReq.priority -> TokenizedReq ->
PrefillTask -> Request.priority): a **higher value is served first**, as in SGLang (whose default
serves larger values first); online requests have `protocol.ONLINE_PRIORITY`, Batch API lines a lower one
(`router/batch_line.py`), so queued online requests are admitted before any queued batch line.
A request put back at the front (preempted) goes ahead of the others of its own priority only:
it keeps its place, it does not jump a higher priority.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from pdserve.protocol import ONLINE_PRIORITY

__all__ = ["ONLINE_PRIORITY", "WaitingQueue"]

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    """FIFO bands, one per priority value, served highest first. `priority_of(item)` must not
    change while the item is queued."""

    def __init__(self, priority_of: Callable[[T], int]) -> None:
        self._priority_of = priority_of
        self._bands: dict[int, deque[T]] = {}  # priority -> its items in service order
        self._order: list[int] = []  # the priorities present, highest first

    def append(self, item: T) -> None:
        """Queue behind every item of the same or a higher priority."""
        self._band(self._priority_of(item)).append(item)

    def appendleft(self, item: T) -> None:
        """Queue ahead of the items of the same priority (a preempted request keeps its place)."""
        self._band(self._priority_of(item)).appendleft(item)

    def popleft(self) -> T:
        """Remove and return the next item to serve; IndexError when empty."""
        if not self._order:
            raise IndexError("pop from an empty WaitingQueue")
        priority = self._order[0]
        band = self._bands[priority]
        item = band.popleft()
        if not band:
            self._drop_band(priority)
        return item

    def remove(self, item: T) -> None:
        """Remove `item` (by identity or equality, as deque.remove); ValueError if absent."""
        priority = self._priority_of(item)
        band = self._bands.get(priority)
        if band is None:
            raise ValueError("item is not in the WaitingQueue")
        band.remove(item)
        if not band:
            self._drop_band(priority)

    def __getitem__(self, index: int) -> T:
        """Only index 0 (the next item to serve) is cheap; others walk the bands."""
        if index == 0 and self._order:
            return self._bands[self._order[0]][0]
        return list(self)[index]

    def __iter__(self) -> Iterator[T]:
        """Items in service order."""
        for priority in list(self._order):
            yield from list(self._bands[priority])

    def __len__(self) -> int:
        return sum(len(band) for band in self._bands.values())

    def __bool__(self) -> bool:
        return bool(self._order)

    def __contains__(self, item: object) -> bool:
        return any(item in band for band in self._bands.values())

    def _band(self, priority: int) -> deque[T]:
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = deque()
            self._order.append(priority)
            self._order.sort(reverse=True)
        return band

    def _drop_band(self, priority: int) -> None:
        del self._bands[priority]
        self._order.remove(priority)
