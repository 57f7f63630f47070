"""Config records no ordinary client writes, and records every client may write compressed."""

from __future__ import annotations

import contextlib
import json

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration import hand_made
from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def raw_producer(deployment: Deployment, **options: object):
    """A plain aiokafka producer to the deployment's broker, as any publisher might use."""
    producer = AIOKafkaProducer(bootstrap_servers=deployment.settings.kafka_bootstrap_servers,
                                **options)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def test_a_header_name_that_is_not_utf8_sends_its_record_to_the_dlq_and_no_other(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    versions = [deployment.doc("c1", interval=5.0, version=v) for v in (1, 2, 3)]
    versions[1]["enabled"] = False
    versions[2]["interval_seconds"] = 7.0
    # One batch: a good record, the bad one, a good one after it.
    sent = await hand_made.publish(
        deployment.settings.kafka_bootstrap_servers, deployment.topics.configs,
        [("c1", json.dumps(doc), bad) for doc, bad in zip(versions, (False, True, False))])
    assert len({partition for partition, _ in sent}) == 1

    record, = await wait_for(lambda: deployment.dlq, timeout=20, what="the DLQ record")
    headers = dict(record.headers)
    assert b"header name \\xff\\xfename is not UTF-8" in headers["error"], headers["error"]
    assert int(headers["source-offset"]) == sent[1][1]
    assert headers["\\xff\\xfename"] == b"v"  # carried, its name made printable
    assert json.loads(record.value) == versions[1]

    await wait_for(lambda: any(e["data"]["config_version"] == 3
                               for e in deployment.events_of("c1", "started")),
                   timeout=20, what="a run of the version after the bad record")
    row = await deployment.row("c1")
    config = json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]
    assert (config["version"], config["interval_seconds"]) == (3, 7.0)

    # The stream carries on with later records.
    await deployment.put("c2", interval=5.0)
    await wait_for(lambda: deployment.events_of("c2", "started"), timeout=20, what="c2 starting")


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_config_records_compressed_with_any_kafka_codec_are_applied(
    deployment: Deployment, codec: str,
) -> None:
    await deployment.start_instance()
    async with raw_producer(deployment, compression_type=codec) as producer:
        doc = deployment.doc(f"{codec}-1", interval=5.0)
        await producer.send_and_wait(deployment.topics.configs, key=doc["id"].encode(),
                                     value=json.dumps(doc).encode())
    await wait_for(lambda: deployment.events_of(doc["id"], "started"), timeout=20,
                   what=f"the {codec}-compressed config starting")
    assert deployment.dlq == []


async def test_a_record_with_a_timestamp_no_date_can_hold_is_applied_and_so_are_the_next(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    async with raw_producer(deployment) as producer:
        for config_id, timestamp in (("ancient", -99_999_999_999_999), ("next", None)):
            doc = deployment.doc(config_id, interval=5.0)
            await producer.send_and_wait(deployment.topics.configs, key=config_id.encode(),
                                         value=json.dumps(doc).encode(), partition=0,
                                         timestamp_ms=timestamp)
    for config_id in ("ancient", "next"):
        await wait_for(lambda: deployment.events_of(config_id, "started"), timeout=20,
                       what=f"{config_id} starting")
    assert deployment.dlq == []


async def test_a_config_written_by_an_aborted_transaction_is_not_applied(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    async with raw_producer(deployment,
                            transactional_id=f"{deployment.settings.group_id}.publisher"
                            ) as producer:
        for config_id, commit in (("aborted", False), ("committed", True)):
            doc = deployment.doc(config_id, interval=5.0)
            await producer.begin_transaction()
            await producer.send_and_wait(deployment.topics.configs, key=config_id.encode(),
                                         value=json.dumps(doc).encode(), partition=0)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    await wait_for(lambda: deployment.events_of("committed", "started"), timeout=20,
                   what="the committed config starting")
    assert await deployment.row("aborted") is None
    assert deployment.events_of("aborted") == []
