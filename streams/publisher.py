"""The publishing side for records outside a run: DLQ copies and config records.

`acks=all` with idempotence, so a send that returns was written once. Every method awaits
the broker's acknowledgement of everything it sent before returning: callers acknowledge
config records only after that. A producer the broker no longer knows (after a restart,
for example) is replaced by a new one and the records are sent once more.

Orders and lifecycle events, whose writers can turn into zombies, go through
`streams.transactions` instead; its types (`OutgoingRecord`, `Deadline`, `Expired`) live
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
# A monotonic time, read afresh each time it is needed, so that a lease renewal moves it.
Deadline = Callable[[], float]


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    key: bytes | None
    value: bytes | None
    headers: Headers


class Expired(Exception):
    """A send's deadline passed before the broker acknowledged all of its records."""


# Errors after which an idempotent producer cannot go on (the broker lost or rejected its
# producer state, for example after a restart); a new producer with a new id can.
_FATAL_TO_PRODUCER = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
                      ProducerFenced)


class Publisher:
    def __init__(self, connection: KafkaConnection, *, request_timeout: float = 30.0) -> None:
        self._connection = connection
        self._request_timeout = request_timeout
        self._producer = self._new_producer()
        self._replacing = asyncio.Lock()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._connection.client_options(),
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=int(self._request_timeout * 1000),
            max_request_size=4 * 1024 * 1024,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, topic: str, record: OutgoingRecord) -> None:
        await self.send_all(topic, [record])

    async def send_all(self, topic: str, records: list[OutgoingRecord]) -> None:
        """Send records in order and wait until the broker acknowledged all of them.

        If the producer is past saving, it is replaced by a new one and the records are
        sent once more (some may then arrive twice: delivery is at least once).
        """
        if not records:
            return
        for attempt in range(2):
            producer = self._producer
            try:
                futures = [
                    await producer.send(topic, value=record.value, key=record.key,
                                        headers=record.headers or None)
                    for record in records
                ]
                results = await asyncio.gather(*futures, return_exceptions=True)
            except _FATAL_TO_PRODUCER as error:
                results = [error]
            first = next((r for r in results if isinstance(r, BaseException)), None)
            if first is None:
                return
            if not isinstance(first, _FATAL_TO_PRODUCER) or attempt == 1:
                raise first
            await self._replace(producer, first)

    async def _replace(self, broken: AIOKafkaProducer, error: Exception) -> None:
        async with self._replacing:
            if self._producer is not broken:
                return  # another sender replaced it already
            log.warning("the producer cannot go on (%s); starting a new one", error)
            self._producer = await self._started_producer()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broken.stop(), 10)

    async def _started_producer(self) -> AIOKafkaProducer:
        """A new producer, started: while the broker is away, tried again every second."""
        logged = False
        while True:
            fresh = self._new_producer()
            try:
                await fresh.start()
                return fresh
            except KafkaError as error:
                if not logged:
                    log.warning("cannot start a new producer (%s); trying again every second",
                                error)
                    logged = True
                with contextlib.suppress(Exception):
                    await fresh.stop()
                await asyncio.sleep(1.0)

    async def reaches_broker(self, *, timeout: float) -> bool:
        """True when a metadata request to the cluster succeeds within `timeout`."""
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    async def partitions_for(self, topic: str) -> set[int]:
        return await self._producer.partitions_for(topic)
