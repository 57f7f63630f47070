"""Transactional sends: records whose send passed its deadline never become visible,
whether the broker was unreachable, the process stood still with them queued, or a zombie's
commit arrived late."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streams.publisher import Expired, OutgoingRecord
from streams.transactions import TransactionalSender
from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration

# The Kafka API key of the request that commits or aborts a transaction.
_END_TXN = 26


def records(tag: str, count: int) -> list[OutgoingRecord]:
    return [OutgoingRecord(key=f"{tag}-{n}".encode(), value=tag.encode(), headers=[])
            for n in range(count)]


def written(deployment: Deployment, tag: str) -> int:
    return sum(1 for r in deployment.orders if r.value == tag.encode())


async def test_records_queued_while_the_process_stood_still_past_their_deadline_are_dropped(
    deployment: Deployment,
) -> None:
    sender = TransactionalSender(deployment.connection,
                                 f"{deployment.settings.group_id}.orders-frozen",
                                 transaction_timeout=10)
    try:
        topic = deployment.topics.orders
        far = time.monotonic() + 60
        await sender.send_all(topic, records("warm-up", 1), deadline=lambda: far)

        deadline = time.monotonic() + 0.3
        send = asyncio.create_task(
            sender.send_all(topic, records("frozen", 20), deadline=lambda: deadline)
        )
        await asyncio.sleep(0)  # the records are queued, not yet committed
        time.sleep(0.6)  # the whole process stands still past the deadline
        with pytest.raises(Expired):
            await send

        far = time.monotonic() + 60
        await sender.send_all(topic, records("after", 5), deadline=lambda: far)
        await wait_for(lambda: written(deployment, "after") == 5, timeout=30,
                       what="the later records")
        await asyncio.sleep(1.0)
        assert written(deployment, "frozen") == 0
    finally:
        await sender.close()


async def test_records_whose_deadline_passes_while_the_broker_is_cut_off_never_arrive(
    deployment: Deployment, kafka_relay,
) -> None:
    relay = await kafka_relay()
    relay_port = relay.listen_port
    connection = dataclasses.replace(deployment.connection,
                                     bootstrap_servers=f"127.0.0.1:{relay_port}")
    sender = TransactionalSender(connection, f"{deployment.settings.group_id}.orders-cut",
                                 transaction_timeout=10)
    try:
        topic = deployment.topics.orders
        far = time.monotonic() + 60
        await sender.send_all(topic, records("before", 3), deadline=lambda: far)

        relay.cut()
        deadline = time.monotonic() + 2.0
        lenient_until = time.monotonic() + 90
        lenient = asyncio.create_task(
            sender.send_all(topic, records("lenient", 4), deadline=lambda: lenient_until))
        with pytest.raises(Expired):
            await sender.send_all(topic, records("cut", 10), deadline=lambda: deadline)
        assert time.monotonic() - deadline < 1.0

        relay.restore()
        # A send whose deadline has not passed goes again once the broker is back.
        await asyncio.wait_for(lenient, 60)
        far = time.monotonic() + 60
        await sender.send_all(topic, records("restored", 2), deadline=lambda: far)
        await wait_for(lambda: written(deployment, "restored") == 2, timeout=30,
                       what="records sent after the cut")
        await wait_for(lambda: written(deployment, "lenient") == 4, timeout=30,
                       what="the send with time left")
        await asyncio.sleep(2.0)
        assert written(deployment, "before") == 3
        assert written(deployment, "cut") == 0
    finally:
        await sender.close()


async def test_a_commit_held_on_the_way_is_refused_once_a_successor_holds_the_id(
    deployment: Deployment, kafka_relay,
) -> None:
    """A zombie's transaction, its records written and its commit sent but held by the
    network until a successor took the transactional id, never becomes visible: the
    successor's start aborted it, and the late commit is refused."""
    relay = await kafka_relay(kafka_requests=True)
    relay_port = relay.listen_port
    held_path = dataclasses.replace(deployment.connection,
                                    bootstrap_servers=f"127.0.0.1:{relay_port}")
    scope = f"{deployment.settings.group_id}.orders-test"
    # The zombie is frozen in the middle of its commit: a bare producer whose commit waits.
    zombie = AIOKafkaProducer(**held_path.client_options(), transactional_id=scope,
                              enable_idempotence=True, acks="all")
    successor = TransactionalSender(deployment.connection, scope, transaction_timeout=10)
    topic = deployment.topics.orders
    try:
        await zombie.start()
        await zombie.begin_transaction()
        for record in records("zombie-late", 10):
            await zombie.send(topic, key=record.key, value=record.value)
        relay.hold_from(_END_TXN)
        commit = asyncio.create_task(zombie.commit_transaction())
        await wait_for(lambda: relay.held_requests >= 1, timeout=10, what="the held commit")

        far = time.monotonic() + 60
        await successor.send_all(topic, records("successor", 3), deadline=lambda: far)
        relay.release()  # the zombie's commit reaches the broker now
        with pytest.raises(KafkaError):
            await asyncio.wait_for(commit, 30)
        await wait_for(lambda: written(deployment, "successor") == 3, timeout=30,
                       what="the successor's records")
        await asyncio.sleep(2.0)
        assert written(deployment, "zombie-late") == 0
    finally:
        await asyncio.wait_for(zombie.stop(), 10)
        await successor.close()


# The Kafka API key of the request that adds a partition to a transaction.
_ADD_PARTITIONS_TO_TXN = 24


async def test_a_send_whose_producer_cannot_drain_its_batches_ends_at_its_deadline(
    deployment: Deployment, kafka_relay,
) -> None:
    """Appending a record waits while its partition's batch is full; a producer that cannot
    send (its partitions never added to the transaction) must not hold the caller past the
    deadline for aiokafka's 30 s per record."""
    relay = await kafka_relay(kafka_requests=True)
    relay_port = relay.listen_port
    held_path = dataclasses.replace(deployment.connection,
                                    bootstrap_servers=f"127.0.0.1:{relay_port}")
    sender = TransactionalSender(held_path, f"{deployment.settings.group_id}.orders-stuck",
                                 transaction_timeout=10)
    topic = deployment.topics.orders
    try:
        far = time.monotonic() + 60
        await sender.send_all(topic, records("warm-up", 1), deadline=lambda: far)
        relay.hold_from(_ADD_PARTITIONS_TO_TXN)

        big = [OutgoingRecord(key=f"stuck-{n}".encode(), value=b"stuck" + b"." * 2000,
                              headers=[]) for n in range(300)]
        began = time.monotonic()
        deadline = began + 2.0
        with pytest.raises(Expired):
            await sender.send_all(topic, big, deadline=lambda: deadline)
        took = time.monotonic() - began
        print(f"the stuck send ended {took:.1f} s after it began (deadline 2 s)")
        assert took < 10.0

        relay.release()
        far = time.monotonic() + 60
        await sender.send_all(topic, records("after", 3), deadline=lambda: far)
        await wait_for(lambda: written(deployment, "after") == 3, timeout=30,
                       what="the later records")
        await asyncio.sleep(1.0)
        assert not any(r.value.startswith(b"stuck") for r in deployment.orders)
    finally:
        await sender.close()
