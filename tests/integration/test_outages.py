"""The broker and the database restarted underneath running instances, under steady load."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import pytest

from tests.integration.harness import Deployment, active_runs, end_counts, rows, wait_for
from tests.integration.test_failover import stop_all

pytestmark = pytest.mark.integration


class SteadyLoad:
    """Publishes config changes without pause, each retried until the broker acknowledged
    it, and remembers the last acknowledged desired state of every config."""

    def __init__(self, deployment: Deployment, ids: list[str]) -> None:
        self.deployment = deployment
        self.ids = ids
        self.versions = {config_id: 1 for config_id in ids}
        self.last: dict[str, dict] = {}
        self.published = 0
        self._random = random.Random(7)
        self._task: asyncio.Task | None = None

    async def put(self, config_id: str, *, enabled: bool, interval: float) -> None:
        doc = self.deployment.doc(config_id, enabled=enabled, interval=interval,
                                  version=self.versions[config_id])
        while True:
            try:
                await asyncio.wait_for(
                    self.deployment.publish_raw(config_id.encode(), json.dumps(doc).encode()),
                    10,
                )
                break
            except Exception:
                await asyncio.sleep(0.5)
        self.versions[config_id] += 1
        self.last[config_id] = doc
        self.published += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            config_id = self._random.choice(self.ids)
            await self.put(config_id, enabled=self._random.random() < 0.7,
                           interval=self._random.choice([0.5, 1.0, 1.5]))
            await asyncio.sleep(0.05)

    def expected_enabled(self) -> set[str]:
        return {i for i, doc in self.last.items() if doc["enabled"]}


async def test_broker_then_database_restarted_under_load_lose_no_change_and_converge(
    deployment: Deployment, stack,
) -> None:
    processes = {name: deployment.spawn_instance(instance_id=name) for name in ("a", "b")}
    ids = [f"cfg-{n:02d}" for n in range(30)]
    load = SteadyLoad(deployment, ids)
    for config_id in ids:
        await load.put(config_id, enabled=True, interval=1.0)
    load.start()
    await asyncio.sleep(5.0)

    await asyncio.to_thread(stack.stop_kafka)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack.start_kafka)
    await asyncio.sleep(8.0)
    await asyncio.to_thread(stack.stop_postgres)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack.start_postgres)
    await asyncio.sleep(5.0)
    await load.stop()
    settled_from = time.monotonic()

    differences: list = []

    async def converged() -> bool:
        found = await rows(deployment.settings.database_url)
        # Converged as the contract says: every enabled config running or waiting out its
        # backoff (runs that failed while the broker was away), no other config running.
        running = {i for i, r in found.items() if r["state"] == "running"}
        settled = running | {i for i, r in found.items() if r["state"] == "backoff"}
        active = active_runs(deployment.events)
        differences[:] = [
            (i, doc["version"], doc["enabled"], r.get("config_version"), r.get("state"),
             r.get("owner"), (r.get("run_id") or "")[:8], (active.get(i) or "")[:8])
            for i, doc in sorted(load.last.items())
            for r in [found.get(i, {})]
            if r.get("config_version") != doc["version"]
            or (i in settled) != doc["enabled"] or (i in running) != (i in active)
        ]
        return not differences

    try:
        await wait_for(converged, timeout=60, what="convergence on the last published changes",
                       show=lambda: differences)
    except AssertionError:
        for name in processes:
            print(deployment.log_tail(name, lines=60))
        raise
    print(f"{load.published} changes published; converged "
          f"{time.monotonic() - settled_from:.1f} s after the load stopped")
    await asyncio.sleep(2.0)
    assert deployment.source.overlaps() == []

    await stop_all(deployment, processes)
    await wait_for(lambda: all(c == 1 for c in end_counts(deployment.events).values()),
                   timeout=30, what="one end event per run",
                   show=lambda: [(e["type"], e["data"]["reason"], e["id"][:8], e["source"],
                                  e["time"], e["data"]["error"])
                                 for e in deployment.events
                                 if end_counts(deployment.events).get(e["data"]["run_id"]) != 1])


def event_ids_once(deployment: Deployment) -> None:
    counts = collections.Counter(e["id"] for e in deployment.events)
    assert [i for i, n in counts.items() if n > 1] == []


async def test_broker_stopped_for_30_s_events_wait_in_the_outbox_and_all_arrive_once(
    deployment: Deployment, stack,
) -> None:
    process = deployment.spawn_instance(instance_id="a")
    ids = [f"cfg-{n:02d}" for n in range(10)]
    for config_id in ids:
        await deployment.put(config_id, interval=0.5)
    await wait_for(lambda: all(active_runs(deployment.events).get(i) for i in ids),
                   timeout=60, what="every config running")
    before = dict(active_runs(deployment.events))

    await asyncio.to_thread(stack.stop_kafka)
    await asyncio.sleep(30.0)
    # Meanwhile the instance stopped its runs (the broker away for a session timeout):
    # their end events could only go to the outbox.
    found = await rows(deployment.settings.database_url)
    assert all(found[i]["run_id"] != before[i] or found[i]["state"] != "running" for i in ids)
    await asyncio.to_thread(stack.start_kafka)

    await wait_for(lambda: all(active_runs(deployment.events).get(i) not in (None, before[i])
                               for i in ids),
                   timeout=90, what="every config running again, its old run ended")
    ended = {e["data"]["run_id"]: e["data"]["reason"] for e in deployment.events
             if e["type"] == "pull.task.stopped"}
    assert {ended.get(before[i]) for i in ids} == {"reassigned"}
    event_ids_once(deployment)

    await stop_all(deployment, {"a": process})
    await wait_for(lambda: all(c == 1 for c in end_counts(deployment.events).values()),
                   timeout=30, what="one end event per run")
    event_ids_once(deployment)
    assert deployment.source.overlaps() == []


async def test_database_stopped_for_30_s_runs_stop_before_their_leases_expire_and_resume(
    deployment: Deployment, stack,
) -> None:
    process = deployment.spawn_instance(instance_id="a")
    ids = [f"cfg-{n:02d}" for n in range(10)]
    for config_id in ids:
        await deployment.put(config_id, interval=0.3)
    await wait_for(lambda: all(active_runs(deployment.events).get(i) for i in ids),
                   timeout=60, what="every config running")
    before = dict(active_runs(deployment.events))

    stopped_at = time.monotonic()
    await asyncio.to_thread(stack.stop_postgres)
    await asyncio.sleep(30.0)
    # Runs stopped themselves within a lease (10 s) of the last renewal: no request since.
    late = [r for r in deployment.source.requests() if r.started > stopped_at + 10.0]
    assert late == []
    await asyncio.to_thread(stack.start_postgres)

    await wait_for(lambda: all(active_runs(deployment.events).get(i) not in (None, before[i])
                               for i in ids),
                   timeout=90, what="every config running again, its old run ended")
    ends = {e["data"]["run_id"]: (e["type"], e["data"]["reason"]) for e in deployment.events
            if e["type"] != "pull.task.started"}
    assert {ends.get(before[i]) for i in ids} == {("pull.task.stopped", "lease-lost")}
    await wait_for(lambda: all(deployment.orders_of(i) for i in ids), timeout=30,
                   what="orders")

    await stop_all(deployment, {"a": process})
    await wait_for(lambda: all(c == 1 for c in end_counts(deployment.events).values()),
                   timeout=30, what="one end event per run")
    event_ids_once(deployment)
    assert deployment.source.overlaps() == []


async def test_source_down_for_a_minute_backs_off_to_the_cap_counts_attempts_and_resumes(
    deployment: Deployment,
) -> None:
    cap = 3.0
    await deployment.start_instance(backoff_initial_seconds=0.5, backoff_max_seconds=cap)
    deployment.source.fail(product_id="c1", status=503)
    await deployment.put("c1", interval=0.2)
    await asyncio.sleep(60.0)

    failed = deployment.events_of("c1", "failed")
    attempts = [e["data"]["attempt"] for e in failed]
    assert attempts == list(range(1, len(failed) + 1))
    assert len(failed) >= 10  # about one attempt per capped delay over the minute
    delays = [e["data"]["retry_in_seconds"] for e in failed]
    assert max(delays) <= cap
    assert min(delays[-5:]) >= cap / 2  # at the cap, with jitter
    row = await deployment.row("c1")
    assert row["state"] == "backoff" and row["attempts"] == len(failed)
    assert "503" in row["last_error"]

    deployment.source.heal(product_id="c1")
    await wait_for(lambda: deployment.orders_of("c1"), timeout=30, what="orders after recovery")

    async def reset() -> bool:
        row = await deployment.row("c1")
        return row["attempts"] == 0 and row["state"] == "running"
    await wait_for(reset, timeout=15, what="attempts reset")
