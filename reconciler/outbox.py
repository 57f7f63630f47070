"""The outbox relay: sends lifecycle events from `lifecycle_outbox` to `<p>.task-events`.

Events are written by the store in the same transaction as the state change they report, so
none is lost when Kafka is away: they wait in the table. The relay takes the oldest rows
under `FOR UPDATE SKIP LOCKED` (several instances may relay at once without sending a row
twice), sends them in order with the idempotent producer, waits for the acknowledgement and
deletes them in the same transaction. It wakes when this instance wrote an event and polls
once a second for the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging

from streams.lifecycle import encode_lifecycle_event
from streams.publisher import OutgoingRecord, Publisher
from reconciler.store import Store

log = logging.getLogger(__name__)

BATCH = 500
POLL_SECONDS = 1.0


class OutboxRelay:
    def __init__(self, *, store: Store, publisher: Publisher, topic: str) -> None:
        self._store = store
        self._publisher = publisher
        self._topic = topic
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self.sent = 0

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.drain()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.warning(
                    "could not send lifecycle events (%s); they wait in the outbox, retrying in "
                    "%.1f s",
                    " ".join(str(error).split()) or type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def drain(self) -> None:
        """Send everything in the outbox now."""
        async with self._lock:
            while await self._send_batch():
                pass

    async def flush(self, *, timeout: float) -> bool:
        """Try to send everything within `timeout`; False if that was not possible."""
        try:
            await asyncio.wait_for(self.drain(), timeout)
            return True
        except (TimeoutError, OSError, Exception) as error:
            if isinstance(error, asyncio.CancelledError):
                raise
            return False

    async def _send_batch(self) -> bool:
        async with self._store.pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, config_id, event FROM lifecycle_outbox ORDER BY id LIMIT $1"
                    " FOR UPDATE SKIP LOCKED",
                    BATCH,
                )
                if not rows:
                    return False
                records = []
                for row in rows:
                    value, headers = encode_lifecycle_event(json.loads(row["event"]))
                    records.append(
                        OutgoingRecord(key=row["config_id"].encode(), value=value, headers=headers)
                    )
                await self._publisher.send_all(self._topic, records)
                await conn.execute(
                    "DELETE FROM lifecycle_outbox WHERE id = ANY($1::bigint[])",
                    [row["id"] for row in rows],
                )
        self.sent += len(rows)
        return len(rows) == BATCH
