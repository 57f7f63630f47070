"""The outbox relay: sends lifecycle events from `lifecycle_outbox` to `<p>.task-events`.

Events are written by the store in the same transaction as the state change they report, so
none is lost when Kafka is away: they wait in the table. Each batch is sent inside one
transaction that holds a PostgreSQL advisory lock, so only one relay in the deployment
sends at a time: it takes the oldest rows in id order, sends them with the idempotent
producer, waits for the acknowledgement and deletes them before committing. A single sender
in id order keeps every config's events in the order of its state changes (the config's row
lock serialises those), so a successor's `started` never overtakes the `stopped` of the run
before it, even across instances.

The lock lasts one batch only, and a batch has a deadline (`BATCH_SECONDS`), taken before
the last statement the batch's session sends: PostgreSQL ends that session, releasing the
lock, only after it sat idle longer than `IDLE_IN_BATCH_SECONDS`, which is longer. So a
relay frozen mid-batch wakes past its deadline and sends nothing, while its successor may
already be sending the same rows. A relay sends nothing while its instance cannot reach
the broker, so an instance that froze or lost the broker mid-batch holds everyone's events
for seconds at most.

Events go out in Kafka transactions under one transactional id for the deployment: the
relay that sends a batch holds the id, so a batch written by an earlier relay that reaches
the broker late is rejected, or aborted and never seen by read-committed consumers.

Never twice: before sending, a batch's rows are marked as attempted in a commit of their
own. A row still in the table with an attempt this relay did not see committed may have
reached Kafka (its relay died between the commit and the delete): before anything is sent
past it, the committed tail of the topic is read, and rows whose event is there are deleted
instead of sent again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streams.connection import KafkaConnection
from streams.lifecycle import encode_lifecycle_event
from streams.publisher import Expired, OutgoingRecord, Publisher
from streams.transactions import TransactionalSender
from reconciler.cancellation import raise_if_cancelling
from reconciler.store import Store

log = logging.getLogger(__name__)

BATCH = 500
REMEMBERED = 100_000
POLL_SECONDS = 1.0
# A batch's deadline, from just before its session's last statement, for everything it
# sends to the broker.
BATCH_SECONDS = 5.0
# Longer than a batch's deadline, so only a relay frozen past it loses its session; the
# difference is the margin for a pause between checking the deadline and sending.
IDLE_IN_BATCH_SECONDS = 10.0
# Records read back per partition when looking for events that may have been sent: every
# record written after a doubtful attempt belongs to that attempt's batch or the one before.
LOOKBACK = 4 * BATCH
# Looking happens under the relay lock: well inside the session's idle limit.
LOOKBACK_SECONDS = 5.0
_RELAY_LOCK = 0x6F7574626F78


class OutboxRelay:
    def __init__(self, *, store: Store, sender: TransactionalSender, publisher: Publisher,
                 connection: KafkaConnection, topic: str,
                 may_send: Callable[[], bool] = lambda: True) -> None:
        self._store = store
        self._sender = sender
        # For the topic's partitions only.
        self._publisher = publisher
        self._connection = connection
        self._topic = topic
        self._may_send = may_send
        self._wakeup = asyncio.Event()
        self.sent = 0
        self.found_sent = 0
        # Outbox row ids Kafka acknowledged, until their delete is committed.
        self._acknowledged: OrderedDict[int, None] = OrderedDict()
        # Row id → attempt number whose event was looked for in the topic and not found.
        self._not_found: OrderedDict[int, int] = OrderedDict()

    def wake(self) -> None:
        self._wakeup.set()

    @staticmethod
    def _remember(memory: OrderedDict, row_id: int, value=None) -> None:
        memory[row_id] = value
        memory.move_to_end(row_id)
        while len(memory) > REMEMBERED:
            memory.popitem(last=False)

    def _doubtful(self, row) -> bool:
        """A row attempted before without an acknowledgement this relay saw."""
        return (row["attempt"] > 0 and row["id"] not in self._acknowledged
                and self._not_found.get(row["id"]) != row["attempt"])

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
                raise_if_cancelling()
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
                # Under the lock: holding the events' transactional id anew fences the
                # relay that sends, so only the relay whose turn it is may do it.
                await self._settle_doubtful()
                deadline = time.monotonic() + BATCH_SECONDS
                rows = await conn.fetch(
                    "SELECT id, config_id, event, attempt FROM lifecycle_outbox "
                    "ORDER BY id LIMIT $1",
                    BATCH,
                )
                if not rows:
                    return False
                # Rows acknowledged earlier whose delete did not commit (the database went
                # away) are deleted now, not sent again; nothing is sent past a row that
                # may have been sent by someone else until the topic has been checked.
                unsent = []
                for row in rows:
                    if self._doubtful(row):
                        break
                    if row["id"] not in self._acknowledged:
                        unsent.append(row)
                failed: BaseException | None = None
                if unsent:
                    await self._store.mark_outbox_attempted([row["id"] for row in unsent])
                    records = []
                    for row in unsent:
                        value, headers = encode_lifecycle_event(json.loads(row["event"]))
                        records.append(OutgoingRecord(key=row["config_id"].encode(),
                                                      value=value, headers=headers))
                    try:
                        await self._sender.send_all(self._topic, records,
                                                    deadline=lambda: deadline)
                    except (Expired, KafkaError) as error:
                        failed = error
                    else:
                        for row in unsent:
                            self._remember(self._acknowledged, row["id"])
                done = [row["id"] for row in rows if row["id"] in self._acknowledged]
                await conn.execute(
                    "DELETE FROM lifecycle_outbox WHERE id = ANY($1::bigint[])", done
                )
        for row_id in done:
            self._acknowledged.pop(row_id, None)
            self._not_found.pop(row_id, None)
        if failed is not None:
            raise failed
        self.sent += len(done)
        return len(rows) == BATCH or any(self._doubtful(row) for row in rows)

    async def _settle_doubtful(self) -> None:
        """Delete the doubtful rows whose event is in the topic; remember the others as
        looked for, at their current attempt."""
        rows = await self._store.pool.fetch(
            "SELECT id, event, attempt FROM lifecycle_outbox WHERE attempt > 0 "
            "ORDER BY id LIMIT $1",
            BATCH,
        )
        doubtful = [row for row in rows if self._doubtful(row)]
        if not doubtful:
            return
        wanted = {json.loads(row["event"])["id"]: row["id"] for row in doubtful}
        # Holding the transactional id anew settles the transaction of the relay that made
        # the attempt: committed or aborted, it is then final in what the topic shows.
        settled_by = time.monotonic() + LOOKBACK_SECONDS
        await self._sender.hold_anew(deadline=lambda: settled_by)
        found = await asyncio.wait_for(self._find_in_topic(set(wanted)), LOOKBACK_SECONDS)
        sent = [wanted[event_id] for event_id in found]
        if sent:
            await self._store.pool.execute(
                "DELETE FROM lifecycle_outbox WHERE id = ANY($1::bigint[])", sent
            )
            self.found_sent += len(sent)
            log.warning("%d lifecycle events found already sent by an earlier attempt; "
                        "deleted from the outbox instead of sent again", len(sent))
        for row in doubtful:
            if row["id"] not in sent:
                self._remember(self._not_found, row["id"], row["attempt"])

    async def _find_in_topic(self, event_ids: set[str]) -> set[str]:
        """Which of these CloudEvent ids are among the last `LOOKBACK` records of each
        partition of the topic."""
        consumer = AIOKafkaConsumer(
            **self._connection.client_options(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(self._topic, p)
                          for p in sorted(await self._publisher.partitions_for(self._topic))]
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            starts = await consumer.beginning_offsets(partitions)
            remaining = set()
            for tp in partitions:
                if ends[tp] > starts[tp]:
                    consumer.seek(tp, max(starts[tp], ends[tp] - LOOKBACK))
                    remaining.add(tp)
            found: set[str] = set()
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        event_id = _event_id(record.value)
                        if event_id in event_ids:
                            found.add(event_id)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return found
        finally:
            await consumer.stop()


def _event_id(value: bytes | None) -> str | None:
    try:
        event = json.loads(value or b"")
    except ValueError:
        return None
    return event.get("id") if isinstance(event, dict) else None
