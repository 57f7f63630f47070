"""One instance on the real broker and database: starts, stops, restarts and their events."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


def started_run_ids(deployment: Deployment, config_id: str) -> list[str]:
    return [e["data"]["run_id"] for e in deployment.events_of(config_id, "started")]


def request_runs(deployment: Deployment, config_id: str) -> list[str]:
    runs: list[str] = []
    for request in deployment.source.requests_for(config_id):
        if request.run_id not in runs:
            runs.append(request.run_id)
    return runs


async def test_same_enabled_config_published_50_times_starts_exactly_one_run(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()

    for _ in range(50):
        await deployment.put("c1", interval=0.3)
    await wait_for(lambda: len(deployment.source.requests_for("c1")) >= 5, timeout=20,
                   what="five pulls")
    await asyncio.sleep(1.0)

    assert len(deployment.events_of("c1", "started")) == 1
    assert len(request_runs(deployment, "c1")) == 1
    row = await deployment.row("c1")
    assert row["state"] == "running"
    assert row["fence"] == 1


async def test_disable_stops_within_two_seconds_and_no_pull_follows(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=0.2)
    await wait_for(lambda: deployment.source.requests_for("c1"), timeout=20, what="first pull")

    disabled_at = time.monotonic()
    await deployment.put("c1", interval=0.2, enabled=False)
    stopped = await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10,
                             what="stopped event")
    assert time.monotonic() - disabled_at < 2.0
    assert stopped[0]["data"]["reason"] == "disabled"

    pulls_at_stop = len(deployment.source.requests_for("c1"))
    await asyncio.sleep(1.0)
    assert len(deployment.source.requests_for("c1")) == pulls_at_stop
    assert (await deployment.row("c1"))["state"] == "stopped"


async def test_disable_then_enable_starts_a_new_run_that_pulls(deployment: Deployment) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=0.2)
    await wait_for(lambda: deployment.source.requests_for("c1"), timeout=20, what="first pull")

    await deployment.put("c1", interval=0.2, enabled=False)
    await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10, what="stop")
    await deployment.put("c1", interval=0.2, enabled=True)

    runs = await wait_for(
        lambda: len(started_run_ids(deployment, "c1")) == 2 and started_run_ids(deployment, "c1"),
        timeout=10, what="second start",
    )
    await wait_for(lambda: runs[1] in request_runs(deployment, "c1"), timeout=10,
                   what="a pull of the new run")
    assert runs[0] != runs[1]
    assert request_runs(deployment, "c1") == runs


async def test_reenable_while_stopping_starts_exactly_one_new_run_after_the_old_one_ended(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=0.2, timeout=30)
    await wait_for(lambda: deployment.source.requests_for("c1"), timeout=20, what="first pull")
    # The next request is held by the source: the loop is inside a pull when the stop comes.
    deployment.source.hang(product_id="c1")
    await wait_for(lambda: deployment.source.in_flight() == 1, timeout=10,
                   what="a pull stuck in the source")

    await deployment.put("c1", interval=0.2, timeout=30, enabled=False)
    await deployment.put("c1", interval=0.2, timeout=30, enabled=True)
    await wait_for(lambda: len(started_run_ids(deployment, "c1")) == 2, timeout=15,
                   what="second start")
    deployment.source.heal(product_id="c1")
    await wait_for(lambda: len(request_runs(deployment, "c1")) == 2, timeout=10,
                   what="a pull of the new run")
    await asyncio.sleep(0.5)

    first, second = started_run_ids(deployment, "c1")
    kinds = [(e["type"], e["data"]["run_id"]) for e in deployment.events_of("c1")]
    assert kinds == [
        ("pull.task.started", first),
        ("pull.task.stopped", first),
        ("pull.task.started", second),
    ]
    assert deployment.source.overlaps() == []


async def test_reenable_while_the_old_loop_is_slow_to_stop_waits_for_it_to_end(
    deployment: Deployment,
) -> None:
    instance = await deployment.start_instance(stop_timeout_seconds=0.5)
    orders = instance.orders
    send_all = orders.send_all
    slow = asyncio.Event()

    async def slow_send_all(scope, topic, records, **options):
        # Publishing a page is the part of a pull a stop does not interrupt: holding it
        # keeps the old loop alive well past the stop bound.
        if slow.is_set() and records:
            await asyncio.sleep(2.5)
        await send_all(scope, topic, records, **options)

    orders.send_all = slow_send_all
    await deployment.put("c1", interval=0.2)
    await wait_for(lambda: deployment.orders_of("c1"), timeout=20, what="first orders")
    slow.set()
    await wait_for(lambda: deployment.source.requests_for("c1")[-1].orders > 0 and
                   len(deployment.source.requests_for("c1")) > 2, timeout=10,
                   what="a page being published")

    await deployment.put("c1", interval=0.2, enabled=False)
    await wait_for(lambda: _state(deployment, "c1", "stopping"), timeout=5, what="stopping")
    await deployment.put("c1", interval=0.2, enabled=True)
    await asyncio.sleep(0.5)
    assert len(started_run_ids(deployment, "c1")) == 1
    slow.clear()

    await wait_for(lambda: len(started_run_ids(deployment, "c1")) == 2, timeout=15,
                   what="second start")
    first, second = started_run_ids(deployment, "c1")
    kinds = [(e["type"], e["data"]["run_id"]) for e in deployment.events_of("c1")]
    assert kinds == [
        ("pull.task.started", first),
        ("pull.task.stopped", first),
        ("pull.task.started", second),
    ]
    await wait_for(lambda: second in request_runs(deployment, "c1"), timeout=10,
                   what="a pull of the new run")
    assert deployment.source.overlaps() == []


async def _state(deployment: Deployment, config_id: str, state: str) -> bool:
    row = await deployment.row(config_id)
    return row is not None and row["state"] == state


async def test_changed_interval_restarts_the_run_with_the_new_interval(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=5.0)
    await wait_for(lambda: deployment.source.requests_for("c1"), timeout=20, what="first pull")

    await deployment.put("c1", interval=0.2)
    stopped = await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10,
                             what="stop")
    assert stopped[0]["data"]["reason"] == "reconfigured"
    new_run = (await wait_for(lambda: len(started_run_ids(deployment, "c1")) == 2 and
                              started_run_ids(deployment, "c1"), timeout=10,
                              what="restart"))[1]

    # With the old 5 s interval all requests of the run would bunch into one pull; at
    # 0.2 s the new run's requests spread over more than a second within 4.5 s.
    def spread() -> float:
        times = [r.started for r in deployment.source.requests_for("c1") if r.run_id == new_run]
        return len(times) > 1 and max(times) - min(times) >= 1.0

    await wait_for(spread, timeout=4.5, what="pulls at the new interval")


async def test_changed_url_restarts_and_pulls_from_the_new_source_without_the_old_cursor(
    deployment: Deployment,
) -> None:
    from reconciler.sample_source import SampleSource

    await deployment.start_instance()
    await deployment.put("c1", interval=0.3)
    await wait_for(lambda: (row := deployment.source.requests_for("c1")) and len(row) >= 2,
                   timeout=20, what="pulls")
    await wait_for(lambda: deployment.row("c1"), timeout=5, what="row")
    other = SampleSource(rate=20.0)
    await other.start()
    try:
        await deployment.put("c1", interval=0.3, url=other.url)
        stopped = await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10,
                                 what="stop")
        assert stopped[0]["data"]["reason"] == "reconfigured"
        first = await wait_for(lambda: other.requests_for("c1"), timeout=10,
                               what="a pull of the new source")
        assert first[0].cursor is None
    finally:
        await other.stop()


async def test_tombstone_stops_the_run_with_reason_deleted_and_the_row_says_deleted(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=0.3)
    await wait_for(lambda: deployment.source.requests_for("c1"), timeout=20, what="first pull")

    await deployment.delete("c1")
    stopped = await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10,
                             what="stop")
    assert stopped[0]["data"]["reason"] == "deleted"

    async def row_deleted() -> bool:
        row = await deployment.row("c1")
        return row["state"] == "deleted" and row["owner"] is None
    await wait_for(row_deleted, timeout=5, what="row deleted")
    row = await deployment.row("c1")
    assert row["deleted"] is True and row["cursor"] is None


async def test_a_tombstone_at_once_followed_by_a_disabled_record_leaves_the_configs_stopped(
    deployment: Deployment,
) -> None:
    """The run stops because of the tombstone, but what its end records is the row's
    desired state by then: the configs exist again, disabled, so their rows say `stopped`."""
    await deployment.start_instance()
    ids = [f"c{n}" for n in range(20)]
    for config_id in ids:
        await deployment.put(config_id, interval=5.0)
    await wait_for(lambda: all(deployment.events_of(i, "started") for i in ids), timeout=30,
                   what="every config started")

    for config_id in ids:
        await deployment.delete(config_id)
        await deployment.put(config_id, interval=5.0, enabled=False)

    async def all_ended() -> list:
        rows = [await deployment.row(i) for i in ids]
        return rows if all(r["owner"] is None and r["state"] != "running" for r in rows) else []
    rows = await wait_for(all_ended, timeout=20, what="every run ended")
    assert {(r["state"], r["deleted"], r["enabled"]) for r in rows} == {("stopped", False, False)}


async def test_failing_source_reports_growing_delays_then_recovers_and_resets_them(
    deployment: Deployment,
) -> None:
    await deployment.start_instance(backoff_initial_seconds=0.3)
    deployment.source.fail(product_id="c1", status=500)
    await deployment.put("c1", interval=0.2)

    failed = await wait_for(lambda: len(deployment.events_of("c1", "failed")) >= 3 and
                            deployment.events_of("c1", "failed"), timeout=20,
                            what="three failures")
    delays = [e["data"]["retry_in_seconds"] for e in failed[:3]]
    assert delays[0] < delays[1] < delays[2]
    assert [e["data"]["attempt"] for e in failed[:3]] == [1, 2, 3]
    assert "500" in failed[0]["data"]["error"]
    run_ids = [e["data"]["run_id"] for e in failed[:3]]
    assert len(set(run_ids)) == 3

    deployment.source.heal(product_id="c1")
    await wait_for(lambda: deployment.orders_of("c1"), timeout=20, what="orders after recovery")

    async def reset() -> bool:
        row = await deployment.row("c1")
        return row["attempts"] == 0 and row["cursor"] is not None and row["last_error"] is None
    await wait_for(reset, timeout=10, what="attempts reset and cursor saved")


async def test_invalid_records_go_to_the_dlq_with_a_reason_and_the_instance_carries_on(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    good = deployment.doc("ok", interval=0.5)
    cases: list[tuple[bytes | None, bytes | None, str]] = [
        (b"bad1", b"{not json", "JSON"),
        (b"bad2", b"[1, 2]", "object"),
        (b"bad3", b"", "empty"),
        (b"bad4", _json({**good, "id": "other"}), "key"),
        (b"bad5", _json({**good, "id": "bad5", "interval_seconds": "5"}), "interval_seconds"),
        (b"bad6", _json({**good, "id": "bad6", "interval_seconds": 0}), "interval_seconds"),
        (b"bad7", _json({**good, "id": "bad7", "source": {"type": "ftp", "url": "x"}}),
         "source.type"),
        (b"bad8", _json({**good, "id": "bad8",
                         "source": {"type": "http", "url": "file:///etc/passwd"}}), "url"),
    ]
    for key, value, _ in cases:
        await deployment.publish_raw(key, value, headers=[("traceparent", b"00-x")])
    await deployment.put("ok", interval=0.5)

    await wait_for(lambda: len(deployment.dlq) >= len(cases), timeout=20, what="DLQ records")
    by_key = {r.key: r for r in deployment.dlq}
    for key, value, word in cases:
        record = by_key[key]
        headers = dict(record.headers)
        assert record.value == value
        assert word.lower() in headers["error"].decode().lower(), headers["error"]
        assert headers["source-topic"] == deployment.topics.configs.encode()
        assert int(headers["source-offset"]) >= 0
        assert headers["traceparent"] == b"00-x"
    await wait_for(lambda: deployment.events_of("ok", "started"), timeout=10,
                   what="the valid config starting")


async def test_equal_version_with_different_content_goes_to_the_dlq(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=1.0, version=3)
    await wait_for(lambda: deployment.events_of("c1", "started"), timeout=20, what="start")

    await deployment.put("c1", interval=2.0, version=3)

    record = await wait_for(lambda: deployment.dlq, timeout=10, what="DLQ record")
    assert b"version 3" in dict(record[0].headers)["error"]
    assert (await deployment.row("c1"))["config"]


async def test_lower_version_is_ignored_without_dlq_event_or_row_change(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=1.0, version=5)
    await wait_for(lambda: deployment.events_of("c1", "started"), timeout=20, what="start")
    before = await deployment.row("c1")

    await deployment.put("c1", interval=1.0, version=4, enabled=False)
    await deployment.put("marker", interval=1.0)
    await wait_for(lambda: deployment.events_of("marker", "started"), timeout=10,
                   what="a later record processed")
    await asyncio.sleep(0.5)

    after = await deployment.row("c1")
    assert deployment.dlq == []
    assert len(deployment.events_of("c1")) == 1
    assert {k: after[k] for k in ("enabled", "config", "config_version", "source_offset")} == {
        k: before[k] for k in ("enabled", "config", "config_version", "source_offset")
    }


async def test_tombstone_followed_by_an_older_version_does_not_bring_the_config_back(
    deployment: Deployment,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=1.0, version=5)
    await wait_for(lambda: deployment.events_of("c1", "started"), timeout=20, what="start")
    await deployment.delete("c1")
    await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10, what="stop")

    await deployment.put("c1", interval=1.0, version=5)
    await deployment.put("c1", interval=1.0, version=4)
    await deployment.put("marker", interval=1.0)
    await wait_for(lambda: deployment.events_of("marker", "started"), timeout=10,
                   what="a later record processed")
    await asyncio.sleep(0.5)

    row = await deployment.row("c1")
    assert row["deleted"] is True and row["state"] == "deleted"
    assert len(deployment.events_of("c1", "started")) == 1
    assert deployment.dlq == []


async def test_reenable_soon_after_a_pull_waits_out_the_interval(deployment: Deployment) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=4.0)
    first = await wait_for(lambda: deployment.source.requests_for("c1"), timeout=20,
                           what="first pull")
    first_pull_at = first[0].started

    async def pull_recorded() -> bool:
        return (await deployment.row("c1"))["last_pull_at"] is not None

    # The interval counts from the last *successful* pull: let the first one finish.
    await wait_for(pull_recorded, timeout=10, what="the first pull recorded")
    await deployment.put("c1", interval=4.0, enabled=False)
    await wait_for(lambda: deployment.events_of("c1", "stopped"), timeout=10, what="stop")
    await deployment.put("c1", interval=4.0, enabled=True)
    await wait_for(lambda: len(deployment.events_of("c1", "started")) == 2, timeout=10,
                   what="restart")

    second_run = deployment.events_of("c1", "started")[1]["data"]["run_id"]
    pulls = await wait_for(
        lambda: [r for r in deployment.source.requests_for("c1") if r.run_id == second_run],
        timeout=15, what="a pull of the new run",
    )
    # The database clock and the source's monotonic clock differ by a constant here;
    # a small allowance covers the difference between "request sent" and "pull start".
    assert pulls[0].started - first_pull_at >= 4.0 - 0.25


def _json(doc: dict) -> bytes:
    import json

    return json.dumps(doc).encode()
