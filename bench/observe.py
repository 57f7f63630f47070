"""What the system under test reports, as it arrives: lifecycle events read from Kafka.

The product's `pull.task.*` CloudEvents on `<p>.task-events` and the scanner's plain
`{"type": "started" | "stopped", "subject": …}` records on `<p>.scanner-events` are read by
one consumer per deployment and stamped with the wall-clock time of their arrival here. A
reaction is measured from just before a change is handed to the producer (or to
PostgreSQL, for the scanner) to that arrival, so both systems are timed through the same
path: their own publish, the broker, this consumer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.connection import KafkaConnection


@dataclass(frozen=True, slots=True)
class Seen:
    """One event, with the time it arrived here (`time.time()`)."""

    arrived: float
    kind: str  # started, stopped or failed
    subject: str
    run_id: str | None
    reason: str | None
    version: int | None


def parse_event(value: bytes, arrived: float) -> Seen | None:
    try:
        event = json.loads(value)
    except ValueError:
        return None
    if "specversion" in event:
        data = event.get("data") or {}
        return Seen(arrived, event["type"].rsplit(".", 1)[-1], event["subject"],
                    data.get("run_id"), data.get("reason"), data.get("config_version"))
    return Seen(arrived, event["type"], event["subject"], event.get("run_id"),
                event.get("reason"), event.get("version"))


class Observer:
    """Follows one events topic from its beginning; waits for events by config and kind."""

    def __init__(self, connection: KafkaConnection, topic: str) -> None:
        self._connection = connection
        self._topic = topic
        self.seen: list[Seen] = []
        self._by_key: dict[tuple[str, str], list[Seen]] = defaultdict(list)
        self._waiters: dict[tuple[str, str], list[tuple[float, asyncio.Future]]] = (
            defaultdict(list))
        self._watchers: list[Callable[[Seen], None]] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            **self._connection.client_options(), group_id=None, enable_auto_commit=False,
            fetch_max_wait_ms=100, isolation_level="read_committed",
        )
        await consumer.start()
        partitions = consumer.partitions_for_topic(self._topic)
        while not partitions:
            await asyncio.sleep(0.1)
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self._topic)
        assignment = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        await consumer.seek_to_beginning(*assignment)
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(), name=f"observe:{self._topic}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def _follow(self) -> None:
        """Read for as long as the benchmark runs: an observer that died quietly would make
        every later wait look like a system that never reacts."""
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                print(f"observer of {self._topic}: reading failed ({error!r}); reading on",
                      file=sys.stderr, flush=True)
                await asyncio.sleep(0.5)
                continue
            arrived = time.time()
            for records in batch.values():
                for record in records:
                    seen = parse_event(record.value, arrived)
                    if seen is not None:
                        self._arrive(seen)

    def _arrive(self, seen: Seen) -> None:
        self.seen.append(seen)
        key = (seen.subject, seen.kind)
        self._by_key[key].append(seen)
        waiting = self._waiters.get(key)
        if waiting:
            still = []
            for since, future in waiting:
                if future.done():
                    continue
                if seen.arrived >= since:
                    future.set_result(seen)
                else:
                    still.append((since, future))
            self._waiters[key] = still
        for watcher in self._watchers:
            watcher(seen)

    def watch(self, watcher: Callable[[Seen], None]) -> None:
        self._watchers.append(watcher)

    def unwatch(self, watcher: Callable[[Seen], None]) -> None:
        self._watchers.remove(watcher)

    async def next_event(self, subject: str, kind: str, *, since: float,
                         timeout: float) -> Seen:
        """The first event of this config and kind that arrived at or after `since`."""
        for seen in self._by_key.get((subject, kind), ()):
            if seen.arrived >= since:
                return seen
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters[(subject, kind)].append((since, future))
        return await asyncio.wait_for(future, timeout)

    async def all_of(self, subjects: Iterable[str], kind: str, *, since: float,
                     timeout: float, stall: float | None = None) -> dict[str, Seen]:
        """Wait until every config has an event of `kind` since `since`; the first of each.
        On a timeout, or when no config was added for `stall` seconds, returns what
        arrived (fewer than asked for)."""
        wanted = set(subjects)
        found: dict[str, Seen] = {}
        for subject in wanted:
            for seen in self._by_key.get((subject, kind), ()):
                if seen.arrived >= since:
                    found[subject] = seen
                    break
        complete = asyncio.Event()

        def watcher(seen: Seen) -> None:
            if (seen.kind == kind and seen.subject in wanted and seen.subject not in found
                    and seen.arrived >= since):
                found[seen.subject] = seen
                if len(found) == len(wanted):
                    complete.set()

        if len(found) == len(wanted):
            return found
        self.watch(watcher)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        progress = (len(found), loop.time())
        try:
            while not complete.is_set() and loop.time() < deadline:
                try:
                    await asyncio.wait_for(complete.wait(), 1.0)
                except TimeoutError:
                    pass
                if len(found) != progress[0]:
                    progress = (len(found), loop.time())
                elif stall is not None and loop.time() - progress[1] > stall:
                    break
        finally:
            self.unwatch(watcher)
        return found

    def active_runs(self) -> dict[str, Seen]:
        """Config → the `started` event of its run that has no end event yet."""
        ended = {s.run_id for s in self.seen if s.kind != "started"}
        active: dict[str, Seen] = {}
        for seen in self.seen:
            if seen.kind == "started" and seen.run_id not in ended:
                active[seen.subject] = seen
        return active
