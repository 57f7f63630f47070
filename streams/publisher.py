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

from streams.connection import KafkaConnection

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    key: bytes | None
    value: bytes | None
    headers: Headers


class Publisher:
    def __init__(self, connection: KafkaConnection, *, request_timeout: float = 30.0) -> None:
        self._producer = AIOKafkaProducer(
            **connection.client_options(),
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=int(request_timeout * 1000),
            max_request_size=4 * 1024 * 1024,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, topic: str, record: OutgoingRecord) -> None:
        await self.send_all(topic, [record])

    async def send_all(self, topic: str, records: list[OutgoingRecord]) -> None:
        """Send records in order and wait until the broker acknowledged all of them."""
        if not records:
            return
        pending = [
            await self._producer.send(
                topic, value=record.value, key=record.key, headers=record.headers or None
            )
            for record in records
        ]
        await asyncio.gather(*pending)

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
