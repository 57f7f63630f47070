"""The HTTP endpoints: health for orchestrators and metrics whose figures follow the loops."""

from __future__ import annotations

import asyncio
import re
import socket

import aiohttp
import aiokafka.consumer.fetcher as aiokafka_fetcher
import pytest
from aiokafka.record.memory_records import MemoryRecords as strict_records

from streams import lenient_records
from tests.integration import hand_made
from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}",
                               timeout=aiohttp.ClientTimeout(total=5)) as response:
            return response.status, await response.text()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format; 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


async def figures(port: int) -> str:
    status, text = await get(port, "/metrics")
    assert status == 200
    return text


async def test_metrics_follow_loops_as_they_start_fail_and_stop(deployment: Deployment) -> None:
    port = free_port()
    await deployment.start_instance(http_port=port, http_host="127.0.0.1",
                                    backoff_initial_seconds=0.3)
    assert (await get(port, "/healthz"))[0] == 200
    before = await figures(port)
    assert metric(before, "reconciler_runs_running") == 0
    assert metric(before, "reconciler_reconciles_total", action="start") == 0

    await deployment.put("c1", interval=0.3)
    await deployment.put("c2", interval=0.3)
    await wait_for(lambda: len(deployment.events_of("c1", "started")) == 1 and
                   len(deployment.events_of("c2", "started")) == 1, timeout=20, what="starts")
    await wait_for(lambda: deployment.orders_of("c1"), timeout=20, what="orders")
    await asyncio.sleep(1.0)
    running = await figures(port)
    assert metric(running, "reconciler_runs_running") == 2
    assert metric(running, "reconciler_runs_started_total") == 2
    assert metric(running, "reconciler_reconciles_total", action="start") == 2
    assert metric(running, "reconciler_pulls_total") >= 2
    assert metric(running, "reconciler_orders_total") >= len(deployment.orders_of("c1"))

    deployment.source.fail(product_id="c1", status=500)
    await wait_for(lambda: deployment.events_of("c1", "failed"), timeout=20, what="a failure")
    await deployment.put("c2", interval=0.3, enabled=False)
    await wait_for(lambda: deployment.events_of("c2", "stopped"), timeout=10, what="a stop")
    await asyncio.sleep(0.5)
    after = await figures(port)
    assert metric(after, "reconciler_pull_errors_total") >= 1
    assert metric(after, "reconciler_runs_ended_total", type="failed") >= 1
    assert metric(after, "reconciler_runs_ended_total", type="stopped", reason="disabled") == 1
    assert metric(after, "reconciler_runs_running") <= 1


async def test_readyz_answers_503_while_postgresql_is_stopped_and_200_after(
    deployment: Deployment, stack,
) -> None:
    port = free_port()
    await deployment.start_instance(http_port=port, http_host="127.0.0.1")
    await wait_for(lambda: get_status(port, "/readyz", 200), timeout=20, what="ready")

    await asyncio.to_thread(stack.stop_postgres)
    try:
        status, text = await get(port, "/readyz")
        assert status == 503 and "database" in text
        assert (await get(port, "/healthz"))[0] == 200
    finally:
        await asyncio.to_thread(stack.start_postgres)
    await wait_for(lambda: get_status(port, "/readyz", 200), timeout=30, what="ready again")


async def get_status(port: int, path: str, expected: int) -> bool:
    try:
        return (await get(port, path))[0] == expected
    except aiohttp.ClientError:
        return False


async def test_readyz_says_not_ready_once_a_record_stops_the_configs_stream(
    deployment: Deployment, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A record the consumer cannot decode at all stops the stream: here one with a header
    # name that is not UTF-8, read by aiokafka's own strict reader instead of the lenient one.
    monkeypatch.setattr(lenient_records, "_installed", True)
    monkeypatch.setattr(aiokafka_fetcher, "MemoryRecords", strict_records)
    port = free_port()
    await deployment.start_instance(http_port=port, http_host="127.0.0.1")
    await wait_for(lambda: get_status(port, "/readyz", 200), timeout=20, what="ready")

    (partition, offset), = await hand_made.publish(
        deployment.settings.kafka_bootstrap_servers, deployment.topics.configs,
        [("poison", "{}", True)])

    await wait_for(lambda: get_status(port, "/readyz", 503), timeout=30, what="not ready")
    status, text = await get(port, "/readyz")
    assert "configs stream stopped reading" in text
    # The instance says where, so an operator can move the group past it.
    where = f"configs partition {partition}: a record at offset {offset} or later cannot be read"
    await wait_for(lambda: any(where in r.getMessage() for r in caplog.records), timeout=30,
                   what="the unreadable record located",
                   show=lambda: [r.getMessage() for r in caplog.records
                                 if r.levelname == "ERROR"])
