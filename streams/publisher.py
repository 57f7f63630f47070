"""The publishing side: one idempotent aiokafka producer for orders, lifecycle events, DLQ
records and config records.

`acks=all` with idempotence, so a send that returns was written once. Every method awaits
the broker's acknowledgement of everything it sent before returning: callers save cursors,
delete outbox rows and acknowledge config records only after that.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from streams.connection import KafkaConnection

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    key: bytes | None
    value: bytes | None
    headers: Headers


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

        If the producer is past saving, it is replaced by a new one and the records are sent
        once more (some may then arrive twice: delivery is at least once).
        """
        if not records:
            return
        producer = self._producer
        try:
            await self._send_with(producer, topic, records)
        except _FATAL_TO_PRODUCER as error:
            await self._replace(producer, error)
            await self._send_with(self._producer, topic, records)

    async def send_each(
        self, topic: str, records: list[OutgoingRecord]
    ) -> list[BaseException | None]:
        """Send records in order; for each, None once acknowledged or the error it met."""
        if not records:
            return []
        producer = self._producer
        try:
            futures = [
                await producer.send(
                    topic, value=record.value, key=record.key, headers=record.headers or None
                )
                for record in records
            ]
        except _FATAL_TO_PRODUCER as error:
            await self._replace(producer, error)
            return [error] * len(records)
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r if isinstance(r, BaseException) else None for r in results]
        fatal = next((e for e in errors if isinstance(e, _FATAL_TO_PRODUCER)), None)
        if fatal is not None:
            await self._replace(producer, fatal)
        return errors

    @staticmethod
    async def _send_with(
        producer: AIOKafkaProducer, topic: str, records: list[OutgoingRecord]
    ) -> None:
        pending = [
            await producer.send(
                topic, value=record.value, key=record.key, headers=record.headers or None
            )
            for record in records
        ]
        await asyncio.gather(*pending)

    async def _replace(self, broken: AIOKafkaProducer, error: Exception) -> None:
        async with self._replacing:
            if self._producer is not broken:
                return  # another sender replaced it already
            log.warning("the producer cannot go on (%s); starting a new one", error)
            fresh = self._new_producer()
            await fresh.start()
            self._producer = fresh
        try:
            await asyncio.wait_for(broken.stop(), 10)
        except Exception:
            pass

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
