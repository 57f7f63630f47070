"""The keyed work queue between incoming records and reconciles.

Records only say *which* config to look at, so the queue holds config ids, not records:

- an id waiting in the queue is there once, however many times it is added;
- an id is handed to at most one worker at a time;
- an id added while a worker holds it is queued again when that worker calls `done`,
  so the change that arrived meanwhile is reconciled too;
- `add_after` schedules an id for later (backoff, waiting for a lease); an earlier `add`
  wins over a later scheduled one;
- `add_background` queues an id behind every id added with `add` (the periodic resync,
  which re-checks every config: a change that arrives meanwhile must not wait behind
  thousands of re-checks); an `add` of an id waiting in the background moves it forward.

It imports neither Kafka nor PostgreSQL and runs on one event loop, so it is tested with
plain asyncio in microseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import OrderedDict


class QueueShutDown(Exception):
    """`get` was called, or was waiting, after `shut_down`."""


class KeyedWorkQueue:
    def __init__(self) -> None:
        self._ready: OrderedDict[str, None] = OrderedDict()
        self._background: OrderedDict[str, None] = OrderedDict()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._delayed: list[tuple[float, int, str]] = []
        self._delayed_due: dict[str, float] = {}
        self._tiebreak = itertools.count()
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._shut_down = False

    def __len__(self) -> int:
        return len(self._ready) + len(self._background)

    @property
    def processing(self) -> frozenset[str]:
        return frozenset(self._processing)

    def add(self, key: str) -> None:
        if self._shut_down:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        self._delayed_due.pop(key, None)
        self._background.pop(key, None)
        if key not in self._ready:
            self._ready[key] = None
            self._wakeup.set()

    def add_background(self, key: str) -> None:
        """Queue the id behind everything `add` queues; nothing if it waits or is being
        processed already."""
        if (self._shut_down or key in self._processing or key in self._ready
                or key in self._background):
            return
        self._background[key] = None
        self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        if self._shut_down or key in self._ready:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        known = self._delayed_due.get(key)
        if known is not None and known <= due:
            return
        self._delayed_due[key] = due
        heapq.heappush(self._delayed, (due, next(self._tiebreak), key))
        self._arm_timer(loop)

    async def get(self) -> str:
        """Wait for the next id and mark it as being processed; call `done` after."""
        while True:
            if self._shut_down:
                raise QueueShutDown
            queued = self._ready or self._background
            if queued:
                key, _ = queued.popitem(last=False)
                self._processing.add(key)
                return key
            self._wakeup.clear()
            await self._wakeup.wait()

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def shut_down(self) -> None:
        self._shut_down = True
        if self._timer is not None:
            self._timer.cancel()
        self._wakeup.set()

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._delayed:
            self._timer = loop.call_at(self._delayed[0][0], self._release_due)

    def _release_due(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            # An entry superseded by an earlier schedule or by `add` is stale: skip it.
            if self._delayed_due.get(key) == due:
                del self._delayed_due[key]
                self.add(key)
        self._timer = None
        self._arm_timer(loop)
