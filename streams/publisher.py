"""The publishing side: idempotent aiokafka producers for orders, lifecycle events, DLQ
records and config records.

`acks=all` with idempotence, so a send that returns was written once. Every method awaits
the broker's acknowledgement of everything it sent before returning: callers save cursors,
delete outbox rows and acknowledge config records only after that.

A send may carry a deadline (a monotonic time, read afresh each time it is needed, so a
lease renewal can push it back). Once the deadline of any send still waiting on a producer
has passed, that producer writes no more produce requests: every request it would write
fails before a byte leaves the process, and a new producer takes over for later sends. So
records whose deadline passed are never written after it, even when the process was frozen
with them queued and the producer's sender runs first when it thaws; only a request already
on the wire at the deadline may still be appended. The send that passed its deadline
raises `Expired`; other sends caught in the refusal go again on the new producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from streams.connection import KafkaConnection

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
Deadline = Callable[[], float]

# The Kafka API key of a produce request.
_PRODUCE = 0
# How often a send with a deadline looks at it while waiting for acknowledgements.
_DEADLINE_POLL_SECONDS = 0.25
# Sends caught in another send's refusal go again at most this often.
_REFUSED_RETRIES = 5


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    key: bytes | None
    value: bytes | None
    headers: Headers


class Expired(Exception):
    """A send's deadline passed before the broker acknowledged all of its records. None of
    them is written after the deadline; some may have been written before it."""


class _Refused(KafkaError):
    """Raised inside the producer's sender: this producer writes no more produce requests."""

    retriable = False


# Errors after which an idempotent producer cannot go on (the broker lost or rejected its
# producer state, for example after a restart); a new producer with a new id can.
_FATAL_TO_PRODUCER = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
                      ProducerFenced, _Refused)


class _Guarded:
    """One producer with the deadlines of the sends waiting on it."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.deadlines: dict[int, Deadline] = {}
        self.refusing = False
        send = producer.client.send

        async def guarded_send(node_id, request, *args, **kwargs):
            if request.API_KEY == _PRODUCE and self.must_refuse():
                raise _Refused("a send's deadline passed; this producer writes no more")
            return await send(node_id, request, *args, **kwargs)

        # The sender writes every produce request through the client's `send`: the last
        # moment before bytes leave the process.
        producer.client.send = guarded_send

    def must_refuse(self) -> bool:
        if not self.refusing:
            now = time.monotonic()
            self.refusing = any(deadline() <= now for deadline in self.deadlines.values())
        return self.refusing


class Publisher:
    def __init__(self, connection: KafkaConnection, *, request_timeout: float = 30.0) -> None:
        self._connection = connection
        self._request_timeout = request_timeout
        self._current = self._new_producer()
        self._replacing = asyncio.Lock()

    def _new_producer(self) -> _Guarded:
        return _Guarded(AIOKafkaProducer(
            **self._connection.client_options(),
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=int(self._request_timeout * 1000),
            max_request_size=4 * 1024 * 1024,
        ))

    async def start(self) -> None:
        await self._current.producer.start()

    async def stop(self) -> None:
        await self._current.producer.stop()

    async def send(self, topic: str, record: OutgoingRecord, *,
                   deadline: Deadline | None = None) -> None:
        await self.send_all(topic, [record], deadline=deadline)

    async def send_all(self, topic: str, records: list[OutgoingRecord], *,
                       deadline: Deadline | None = None) -> None:
        """Send records in order and wait until the broker acknowledged all of them.

        Raises `Expired` when `deadline` passes first. If the producer is past saving, it
        is replaced by a new one and the records are sent once more (some may then arrive
        twice: delivery is at least once).
        """
        if not records:
            return
        refused = 0
        replaced = False
        while True:
            guarded = await self._usable_by(deadline)
            try:
                errors = await self._send_with(guarded, topic, records, deadline)
            except _FATAL_TO_PRODUCER as error:
                errors = [error]
            first = next((e for e in errors if e is not None), None)
            if first is None:
                return
            if isinstance(first, _FATAL_TO_PRODUCER):
                await self._replace(guarded, first)
                if isinstance(first, _Refused):
                    if refused < _REFUSED_RETRIES:
                        refused += 1
                        continue
                elif not replaced:
                    replaced = True
                    continue
            raise first

    async def send_each(
        self, topic: str, records: list[OutgoingRecord], *, deadline: Deadline | None = None
    ) -> list[BaseException | None]:
        """Send records in order; for each, None once acknowledged or the error it met
        (`Expired` for those still unacknowledged at the deadline)."""
        if not records:
            return []
        try:
            guarded = await self._usable_by(deadline)
        except Expired as expired:
            return [expired] * len(records)
        try:
            errors = await self._send_with(guarded, topic, records, deadline)
        except _FATAL_TO_PRODUCER as error:
            await self._replace(guarded, error)
            return [error] * len(records)
        fatal = next((e for e in errors if isinstance(e, _FATAL_TO_PRODUCER)), None)
        if fatal is not None:
            await self._replace(guarded, fatal)
        return errors

    async def _send_with(
        self, guarded: _Guarded, topic: str, records: list[OutgoingRecord],
        deadline: Deadline | None,
    ) -> list[BaseException | None]:
        """Hand the records to the producer and wait for each one's outcome."""
        if deadline is not None and deadline() <= time.monotonic():
            return [Expired("the deadline passed before the records were sent")] * len(records)
        key = object()
        if deadline is not None:
            guarded.deadlines[id(key)] = deadline
        try:
            futures = [
                await guarded.producer.send(
                    topic, value=record.value, key=record.key, headers=record.headers or None
                )
                for record in records
            ]
            if deadline is None:
                results = await asyncio.gather(*futures, return_exceptions=True)
                return [r if isinstance(r, BaseException) else None for r in results]
            return await self._outcomes(guarded, futures, deadline)
        finally:
            guarded.deadlines.pop(id(key), None)

    @staticmethod
    async def _outcomes(
        guarded: _Guarded, futures: list[asyncio.Future], deadline: Deadline
    ) -> list[BaseException | None]:
        waiting = set(futures)
        while waiting:
            remaining = deadline() - time.monotonic()
            if remaining <= 0:
                guarded.refusing = True
                for future in waiting:
                    # Their outcome no longer matters; keep asyncio from reporting it.
                    future.add_done_callback(lambda f: f.cancelled() or f.exception())
                break
            _, waiting = await asyncio.wait(
                waiting, timeout=min(remaining, _DEADLINE_POLL_SECONDS)
            )
        expired = Expired("the deadline passed before the broker acknowledged the records")
        return [
            expired if not future.done() else
            (future.exception() if not future.cancelled() else asyncio.CancelledError())
            for future in futures
        ]

    async def _usable(self) -> _Guarded:
        current = self._current
        if current.must_refuse():
            await self._replace(current, _Refused("a send's deadline passed"))
        return self._current

    async def _replace(self, broken: _Guarded, error: Exception) -> None:
        async with self._replacing:
            if self._current is not broken:
                return  # another sender replaced it already
            if isinstance(error, _Refused):
                log.info("a send passed its deadline; its records are dropped and a new "
                         "producer takes over")
            else:
                log.warning("the producer cannot go on (%s); starting a new one", error)
            fresh = await self._started_producer()
            self._current = fresh
        broken.refusing = True
        try:
            await asyncio.wait_for(broken.producer.stop(), 10)
        except Exception:
            pass

    async def _started_producer(self) -> _Guarded:
        """A new producer, started: while the broker is away, tried again every second."""
        logged = False
        while True:
            fresh = self._new_producer()
            try:
                await fresh.producer.start()
                return fresh
            except KafkaError as error:
                if not logged:
                    log.warning("cannot start a new producer (%s); trying again every second",
                                error)
                    logged = True
                with contextlib.suppress(Exception):
                    await fresh.producer.stop()
                await asyncio.sleep(1.0)

    async def _usable_by(self, deadline: Deadline | None) -> _Guarded:
        """`_usable`, but given up (as `Expired`) once the deadline passes."""
        if deadline is None:
            return await self._usable()
        remaining = deadline() - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(self._usable()), max(0.0, remaining))
        except TimeoutError:
            raise Expired("the deadline passed while the producer was being replaced") from None

    async def reaches_broker(self, *, timeout: float) -> bool:
        """True when a metadata request to the cluster succeeds within `timeout`."""
        try:
            await asyncio.wait_for(
                self._current.producer.client.fetch_all_metadata(), timeout
            )
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    async def partitions_for(self, topic: str) -> set[int]:
        return await self._current.producer.partitions_for(topic)
