"""`reconciler run` as a process: graceful restarts keep cursors and publish nothing twice."""

from __future__ import annotations

import asyncio
import collections

import pytest

from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


async def test_graceful_restart_resumes_from_saved_cursors_without_republishing(
    deployment: Deployment,
) -> None:
    first = deployment.spawn_instance(instance_id="a")
    for n in range(3):
        await deployment.put(f"c{n}", interval=0.3)
    await wait_for(lambda: all(len(deployment.orders_of(f"c{n}")) >= 10 for n in range(3)),
                   timeout=60, what="orders of every config")

    assert deployment.terminate(first) == 0
    await wait_for(lambda: all(deployment.events_of(f"c{n}", "stopped") for n in range(3)),
                   timeout=10, what="stopped events")
    saved = {f"c{n}": (await deployment.row(f"c{n}"))["cursor"] for n in range(3)}
    requests_before = {c: len(deployment.source.requests_for(c)) for c in saved}
    assert all(e["data"]["reason"] == "shutdown" for n in range(3)
               for e in deployment.events_of(f"c{n}", "stopped"))
    assert all(saved.values())

    deployment.spawn_instance(instance_id="a")
    await wait_for(lambda: all(len(deployment.events_of(c, "started")) == 2 for c in saved),
                   timeout=60, what="second starts")
    await wait_for(lambda: all(len(deployment.source.requests_for(c)) > requests_before[c] + 2
                               for c in saved), timeout=30, what="pulls after the restart")

    for config_id, cursor in saved.items():
        resumed = deployment.source.requests_for(config_id)[requests_before[config_id]]
        assert resumed.cursor == cursor
    keys = collections.Counter(record.key for record in deployment.orders)
    assert [key for key, count in keys.items() if count > 1] == []


async def test_run_exits_with_status_1_naming_kafka_when_the_broker_cannot_be_reached(
    deployment: Deployment,
) -> None:
    process = deployment.spawn_instance(
        instance_id="lost", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"
    )
    code = await asyncio.to_thread(process.wait, 120)
    assert code == 1


async def test_run_refuses_to_start_when_the_configs_topic_is_not_compacted(
    settings, endpoints
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from tests.integration.harness import Deployment

    admin = AIOKafkaAdminClient(bootstrap_servers=endpoints["KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{settings.topic_prefix}.configs", 3, 1,
                                            topic_configs={"cleanup.policy": "delete"})])
    finally:
        await admin.close()
    deployment = Deployment(settings=settings, source=None)

    process = deployment.spawn_instance(instance_id="strict")
    code = await asyncio.to_thread(process.wait, 120)

    assert code == 1
    log = open(f"/tmp/{settings.topic_prefix}-strict.log").read()
    assert "cleanup.policy='delete'" in log and "compact" in log
