"""The outbox relay: sends lifecycle events from `lifecycle_outbox` to `<p>.task-events`.

Events are written by the store in the same transaction as the state change they report, so
none is lost when Kafka is away: they wait in the table. Each batch is sent inside one
transaction that holds a PostgreSQL advisory lock, so only one relay in the deployment
sends at a time: it takes the oldest rows in id order, sends them with the idempotent
producer, waits for the acknowledgement and deletes them before committing. A single sender
in id order keeps every config's events in the order of its state changes (the config's row
lock serialises those), so a successor's `started` never overtakes the `stopped` of the run
before it, even across instances. The lock lasts one batch only, and a batch has a deadline
(`BATCH_SECONDS`): events not acknowledged by then are dropped by the producer, never written
later, the transaction rolls back and another relay may send them. PostgreSQL ends the
relay's session if it sits in the transaction longer than that (a frozen relay), and a relay
sends nothing while its instance cannot reach the broker. So an instance that froze or lost
the broker mid-batch holds everyone's events for seconds at most, and an event is sent twice
only if a request carrying it was already on the wire at the deadline and the broker's
acknowledgement was lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Callable

from streams.lifecycle import encode_lifecycle_event
from streams.publisher import OutgoingRecord, Publisher
from reconciler.store import Store

log = logging.getLogger(__name__)

BATCH = 500
REMEMBERED = 100_000
POLL_SECONDS = 1.0
# A batch's deadline for the broker's acknowledgements.
BATCH_SECONDS = 5.0
# Longer than a batch's deadline, so only a frozen relay hits it.
IDLE_IN_BATCH_SECONDS = 10.0
_RELAY_LOCK = 0x6F7574626F78


class OutboxRelay:
    def __init__(self, *, store: Store, publisher: Publisher, topic: str,
                 may_send: Callable[[], bool] = lambda: True) -> None:
        self._store = store
        self._may_send = may_send
        self._publisher = publisher
        self._topic = topic
        self._wakeup = asyncio.Event()
        self.sent = 0
        # Outbox row ids Kafka acknowledged, until their delete is committed.
        self._acknowledged: OrderedDict[int, None] = OrderedDict()

    def wake(self) -> None:
        self._wakeup.set()

    def _remember(self, row_id: int) -> None:
        self._acknowledged[row_id] = None
        while len(self._acknowledged) > REMEMBERED:
            self._acknowledged.popitem(last=False)

    async def wait_until_sent(self, *, timeout: float) -> bool:
        """Wait, bounded, until the outbox is empty; for a graceful shutdown."""
        self.wake()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                if await self._store.outbox_depth() == 0:
                    return True
            except Exception:
                return False
            await asyncio.sleep(0.1)
        return False

    async def run(self) -> None:
        failures = 0
        while True:
            await self._nap()
            try:
                while await self._send_batch():
                    pass
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                delay = min(10.0, 0.5 * 2**failures)
                log.warning(
                    "could not send lifecycle events (%s); they wait in the outbox, retrying "
                    "in %.1f s",
                    " ".join(str(error).split()) or type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _nap(self) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def _send_batch(self) -> bool:
        """Send one batch if no other relay is sending; True when more may be waiting."""
        if not self._may_send():
            return False
        async with self._store.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(
                    f"SET LOCAL idle_in_transaction_session_timeout = "
                    f"'{int(IDLE_IN_BATCH_SECONDS * 1000)}ms'"
                )
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK):
                    # Another relay is sending, in order, everything committed so far;
                    # look again shortly for what it may not have seen.
                    self._wakeup.set()
                    await asyncio.sleep(0.05)
                    return False
                rows = await conn.fetch(
                    "SELECT id, config_id, event FROM lifecycle_outbox ORDER BY id LIMIT $1",
                    BATCH,
                )
                if not rows:
                    return False
                # Rows acknowledged earlier whose delete did not commit (the database went
                # away) are deleted now, not sent again.
                unsent = [row for row in rows if row["id"] not in self._acknowledged]
                records = []
                for row in unsent:
                    value, headers = encode_lifecycle_event(json.loads(row["event"]))
                    records.append(
                        OutgoingRecord(key=row["config_id"].encode(), value=value,
                                       headers=headers)
                    )
                deadline = time.monotonic() + BATCH_SECONDS
                errors = await self._publisher.send_each(self._topic, records,
                                                         deadline=lambda: deadline)
                for row, error in zip(unsent, errors):
                    if error is None:
                        self._remember(row["id"])
                done = [row["id"] for row in rows if row["id"] in self._acknowledged]
                await conn.execute(
                    "DELETE FROM lifecycle_outbox WHERE id = ANY($1::bigint[])", done
                )
        for row_id in done:
            self._acknowledged.pop(row_id, None)
        failed = next((error for error in errors if error is not None), None)
        if failed is not None:
            raise failed
        self.sent += len(done)
        return len(rows) == BATCH
