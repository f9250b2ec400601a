"""Timers for the agent's single-threaded loop (the freeze watchdog uses one)."""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable


class Scheduler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> int:
        """Run ``callback`` after ``delay`` seconds; returns a handle for cancel()."""
        handle = next(self._ids)
        heapq.heappush(self._heap, (self._clock() + delay, handle, callback))
        return handle

    def cancel(self, handle: int | None) -> None:
        if handle is not None:
            self._cancelled.add(handle)

    def timeout(self, default: float | None) -> float | None:
        """Seconds until the next timer (for select), or ``default``."""
        self._drop_cancelled()
        if not self._heap:
            return default
        wait = max(0.0, self._heap[0][0] - self._clock())
        return wait if default is None else min(wait, default)

    def run_due(self) -> None:
        now = self._clock()
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > now:
                return
            _, _, callback = heapq.heappop(self._heap)
            callback()

    def _drop_cancelled(self) -> None:
        while self._heap and self._heap[0][1] in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._heap)[1])
