"""The outbox relay sends each lifecycle event once, even when the relay that sent it died
before it could delete the rows, and sends what a dead relay only tried to send."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid

import pytest

from streams.lifecycle import lifecycle_event
from streams.transactions import TransactionalSender
from reconciler import outbox
from reconciler.outbox import OutboxRelay
from reconciler.store import Store
from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


class Died(Exception):
    """The relay's process ended at this point."""


async def open_store(deployment: Deployment) -> Store:
    store = await Store.connect(deployment.settings.database_url, instance_id="relay-test",
                                boot_id=uuid.uuid4().hex, pool_size=4, timeout=10)
    await store.migrate()
    return store


async def insert_events(store: Store, count: int) -> list[str]:
    ids = []
    for n in range(count):
        event = lifecycle_event(event_type="pull.task.started", config_id=f"cfg-{n}",
                                run_id=uuid.uuid4().hex, instance_id="a", emitter_id="a",
                                fence=1, config_version=None)
        await store.pool.execute(
            "INSERT INTO lifecycle_outbox (config_id, event) VALUES ($1, $2::jsonb)",
            f"cfg-{n}", json.dumps(event),
        )
        ids.append(event["id"])
    return ids


def relay_for(deployment: Deployment, store: Store) -> OutboxRelay:
    """A relay of its own, as in another instance: its own producer for the deployment's
    events transactional id."""
    sender = TransactionalSender(deployment.connection,
                                 f"{deployment.settings.group_id}.task-events",
                                 transaction_timeout=10)
    deployment.on_close(sender.close)
    return OutboxRelay(store=store, sender=sender, publisher=deployment.publisher,
                       connection=deployment.connection, topic=deployment.topics.task_events)


async def each_event_once(deployment: Deployment, ids: list[str], *, settle: float) -> None:
    """Every one of these events arrives, and, `settle` seconds later, none twice."""
    await wait_for(lambda: len(deployment.events) >= len(ids), timeout=30, what="the events")
    await asyncio.sleep(settle)
    counts = collections.Counter(e["id"] for e in deployment.events)
    assert {i: counts[i] for i in ids} == {i: 1 for i in ids}


async def drain(relay: OutboxRelay, store: Store) -> None:
    async def empty() -> bool:
        await relay._send_batch()
        return await store.outbox_depth() == 0
    await wait_for(empty, timeout=30, what="an empty outbox")


async def test_events_a_dead_relay_had_sent_are_found_in_the_topic_and_not_sent_again(
    deployment: Deployment,
) -> None:
    store = await open_store(deployment)
    try:
        ids = await insert_events(store, 40)
        dying = relay_for(deployment, store)
        send_all = dying._sender.send_all

        async def send_then_die(topic, records, **options):
            await send_all(topic, records, **options)
            raise Died()  # committed in Kafka, never deleted from the outbox

        dying._sender = type("S", (), {"send_all": staticmethod(send_then_die)})()
        with pytest.raises(Died):
            await dying._send_batch()
        assert await store.outbox_depth() == 40

        successor = relay_for(deployment, store)
        await drain(successor, store)
        assert successor.found_sent == 40

        await each_event_once(deployment, ids, settle=1.0)
    finally:
        await store.close()


async def test_events_a_dead_relay_only_tried_to_send_are_sent_once_by_the_next(
    deployment: Deployment,
) -> None:
    store = await open_store(deployment)
    try:
        ids = await insert_events(store, 25)
        dying = relay_for(deployment, store)

        async def die_before_sending(topic, records, **options):
            raise Died()

        dying._sender = type("S", (), {"send_all": staticmethod(die_before_sending)})()
        with pytest.raises(Died):
            await dying._send_batch()
        attempts = await store.pool.fetch("SELECT attempt FROM lifecycle_outbox")
        assert [r["attempt"] for r in attempts] == [1] * 25

        successor = relay_for(deployment, store)
        await drain(successor, store)
        assert successor.found_sent == 0

        await each_event_once(deployment, ids, settle=1.0)
    finally:
        await store.close()


async def test_a_relay_stuck_past_its_session_sends_nothing_its_successor_sent(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay that stalls after reading its batch (frozen, or its marking write stuck)
    loses its session, and with it the lock, after the idle limit; the next relay sends
    the rows. When the first one moves again its batch deadline has passed: it sends
    nothing, so every event is in the topic once."""
    monkeypatch.setattr(outbox, "BATCH_SECONDS", 1.0)
    monkeypatch.setattr(outbox, "IDLE_IN_BATCH_SECONDS", 2.0)
    store = await open_store(deployment)
    stuck_store = await open_store(deployment)
    try:
        ids = await insert_events(store, 30)
        stuck = relay_for(deployment, stuck_store)
        unstuck = asyncio.Event()
        mark = stuck_store.mark_outbox_attempted

        async def stalled_mark(row_ids):
            await unstuck.wait()
            await mark(row_ids)

        stuck_store.mark_outbox_attempted = stalled_mark
        stalled = asyncio.create_task(stuck._send_batch())
        await asyncio.sleep(0.5)
        assert not stalled.done()

        successor = relay_for(deployment, store)
        await drain(successor, store)  # possible only once the stuck session was ended
        await wait_for(lambda: len(deployment.events) >= 30, timeout=30, what="the events")

        unstuck.set()
        with pytest.raises(Exception):
            await asyncio.wait_for(stalled, 30)  # its session is gone
        assert stuck._sender.transactions == 0
        await asyncio.sleep(2.0)
        counts = collections.Counter(e["id"] for e in deployment.events)
        assert {i: counts[i] for i in ids} == {i: 1 for i in ids}
    finally:
        await stuck_store.close()
        await store.close()


async def test_a_relay_waiting_for_the_lock_leaves_the_sending_relay_unfenced(
    deployment: Deployment,
) -> None:
    """While one relay sends a batch, another that finds the batch's rows attempted does
    not take the events' transactional id (which would fence the sender mid-transaction,
    and let its late commit and a resend both land); it waits for the lock."""
    store = await open_store(deployment)
    try:
        ids = await insert_events(store, 20)
        sending = relay_for(deployment, store)
        waiting = relay_for(deployment, store)
        send_all = sending._sender.send_all
        in_flight = asyncio.Event()

        async def slow_send_all(topic, records, **options):
            in_flight.set()
            await asyncio.sleep(1.5)
            await send_all(topic, records, **options)

        sending._sender.send_all = slow_send_all
        batch = asyncio.create_task(sending._send_batch())
        await asyncio.wait_for(in_flight.wait(), 10)
        assert not await waiting._send_batch()  # the lock is taken
        assert waiting._sender.starts == 0
        await asyncio.wait_for(batch, 30)

        await drain(waiting, store)
        await each_event_once(deployment, ids, settle=1.0)
    finally:
        await store.close()
