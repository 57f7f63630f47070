"""The command line against a running instance: put, validate, enable, disable, delete,
status and events, with the contract's exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from streams.publisher import OutgoingRecord
from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


async def cli(deployment: Deployment, *args: str, stdin: str | None = None,
              **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": deployment.settings.kafka_bootstrap_servers,
        "DATABASE_URL": deployment.settings.database_url,
        "RECONCILER_TOPIC_PREFIX": deployment.settings.topic_prefix,
        "RECONCILER_CONFIG_PARTITIONS": str(deployment.settings.config_partitions),
        **env,
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "reconciler.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


async def test_config_put_publishes_every_config_and_the_instance_starts_them(
    deployment: Deployment, tmp_path
) -> None:
    await deployment.start_instance()
    document = [deployment.doc("a", interval=0.5), deployment.doc("b", interval=0.5)]
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(document))

    result = await cli(deployment, "config", "put", str(path))

    assert result.returncode == 0, result.stderr
    assert "published 2 configs" in result.stdout
    await wait_for(lambda: deployment.events_of("a", "started") and
                   deployment.events_of("b", "started"), timeout=15, what="both started")


async def test_config_put_with_one_invalid_config_publishes_nothing_and_exits_2(
    deployment: Deployment,
) -> None:
    document = [deployment.doc("a"), {**deployment.doc("b"), "interval_seconds": "5"}]

    result = await cli(deployment, "config", "put", "-", stdin=json.dumps(document))

    assert result.returncode == 2
    assert "interval_seconds" in result.stderr and "nothing published" in result.stderr
    await asyncio.sleep(1.0)
    assert deployment.events == []


async def test_config_validate_prints_one_line_per_problem_and_exits_2(
    deployment: Deployment,
) -> None:
    document = [{**deployment.doc("a"), "enabled": 1},
                {**deployment.doc("b"), "source": {"type": "ftp", "url": "x"}}]

    result = await cli(deployment, "config", "validate", "-", stdin=json.dumps(document))

    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 2
    assert any("enabled" in line for line in lines)
    assert any("source.type" in line for line in lines)


async def test_config_validate_accepts_a_valid_document(deployment: Deployment) -> None:
    result = await cli(deployment, "config", "validate", "-",
                       stdin=json.dumps(deployment.doc("a")))
    assert result.returncode == 0
    assert "1 valid config" in result.stdout


async def test_config_schema_prints_a_json_schema(deployment: Deployment) -> None:
    result = await cli(deployment, "config", "schema")
    schema = json.loads(result.stdout)
    assert "interval_seconds" in schema["properties"]
    assert set(schema["required"]) >= {"id", "enabled", "channel_id", "product_id"}


async def test_disable_enable_and_delete_read_the_desired_state_and_bump_the_version(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("a", interval=0.5, version=7)
    await wait_for(lambda: deployment.events_of("a", "started"), timeout=15, what="start")

    result = await cli(deployment, "config", "disable", "a")
    assert result.returncode == 0, result.stderr
    stopped = await wait_for(lambda: deployment.events_of("a", "stopped"), timeout=10,
                             what="stop")
    assert stopped[0]["data"]["reason"] == "disabled"
    assert (await deployment.row("a"))["config_version"] == 8

    assert (await cli(deployment, "config", "enable", "a")).returncode == 0
    await wait_for(lambda: len(deployment.events_of("a", "started")) == 2, timeout=10,
                   what="second start")
    assert (await deployment.row("a"))["config_version"] == 9

    assert (await cli(deployment, "config", "delete", "a")).returncode == 0
    await wait_for(lambda: len(deployment.events_of("a", "stopped")) == 2, timeout=10,
                   what="delete")
    assert deployment.events_of("a", "stopped")[1]["data"]["reason"] == "deleted"


async def test_enable_of_an_unknown_config_exits_2_with_the_reason(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    result = await cli(deployment, "config", "enable", "nope")
    assert result.returncode == 2
    assert "nope" in result.stderr and "not known" in result.stderr


async def test_status_json_and_events_show_the_running_config(deployment: Deployment) -> None:
    await deployment.start_instance()
    await deployment.put("a", interval=0.5)
    await wait_for(lambda: deployment.events_of("a", "started"), timeout=15, what="start")

    status = await cli(deployment, "status", "--json")
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert status.returncode == 0
    assert [(r["config_id"], r["state"], r["owner"]) for r in rows] == [
        ("a", "running", deployment.settings.instance_id)
    ]

    events = await cli(deployment, "events", "--json")
    assert events.returncode == 0
    types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
    assert types == ["pull.task.started"]


async def test_events_skips_a_record_without_a_value_and_shows_the_rest(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.publisher.send(deployment.topics.task_events,
                                    OutgoingRecord(key=b"junk", value=None, headers=[]))
    await deployment.put("a", interval=0.5)
    await wait_for(lambda: deployment.events_of("a", "started"), timeout=15, what="start")

    for arguments in (("events",), ("events", "--json")):
        events = await cli(deployment, *arguments)
        assert events.returncode == 0, events.stderr
        assert "skipping a record that is not a lifecycle event: it has no value" in events.stderr
        assert "started" in events.stdout


async def test_events_says_so_when_there_are_none_yet(deployment: Deployment) -> None:
    await deployment.start_instance()

    events = await cli(deployment, "events")
    assert events.returncode == 0
    assert events.stdout == ""
    assert f"no lifecycle events in {deployment.topics.task_events} yet" in events.stderr

    as_json = await cli(deployment, "events", "--json")
    assert (as_json.returncode, as_json.stdout, as_json.stderr) == (0, "", "")


async def test_status_exits_1_naming_postgresql_when_the_database_cannot_be_reached(
    deployment: Deployment,
) -> None:
    result = await cli(deployment, "status",
                       DATABASE_URL="postgresql://someone:secret@127.0.0.1:1/nowhere")
    assert result.returncode == 1
    assert "PostgreSQL at 127.0.0.1:1/nowhere" in result.stderr
    assert "secret" not in result.stderr


async def test_status_prints_one_line_per_live_instance(deployment: Deployment) -> None:
    await deployment.start_instance()
    await deployment.put("a", interval=0.5)
    await wait_for(lambda: deployment.events_of("a", "started"), timeout=15, what="start")

    result = await cli(deployment, "status")

    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("instance ")]
    assert len(line) == 1
    assert line[0].startswith(f"instance {deployment.settings.instance_id} (boot ")
    assert "alive" in line[0] and "1 leases held" in line[0]


async def test_status_counts_leases_by_boot_so_an_earlier_boot_holds_none(
    deployment: Deployment,
) -> None:
    first = await deployment.start_instance()
    await deployment.put("a", interval=0.5)
    await wait_for(lambda: deployment.events_of("a", "started"), timeout=15, what="start")
    await deployment.stop_instance(first)
    await deployment.start_instance()
    await wait_for(lambda: len(deployment.events_of("a", "started")) == 2, timeout=30,
                   what="a start by the second boot")

    result = await cli(deployment, "status")

    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("instance ")]
    assert len(lines) == 2, lines
    assert "stopped" in lines[0] and "0 leases held" in lines[0]
    assert "alive" in lines[1] and "1 leases held" in lines[1]


async def test_events_names_kafka_when_the_broker_does_not_answer(
    deployment: Deployment, kafka_relay,
) -> None:
    relay = await kafka_relay()
    relay.freeze()  # connections accepted, no byte through
    events = await cli(deployment, "events",
                       KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{relay.listen_port}")
    assert events.returncode == 1
    assert events.stderr.startswith(
        f"reconciler: cannot reach Kafka at 127.0.0.1:{relay.listen_port}"), events.stderr
    assert "PostgreSQL" not in events.stderr
