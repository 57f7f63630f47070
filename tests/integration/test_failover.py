"""Several `reconciler run` processes in one group: partitioned ownership, failover after
kills, freezes and cut connections, and never two runs of one config at once.

Overlap is measured at the sample order source, which records every request's run id and
time: two run ids of one config with requests interleaved in time are a violation.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import socket
import time

import pytest

from tests.integration.harness import (
    Deployment,
    active_runs,
    end_counts,
    rows,
    wait_for,
)
from tests.integration.relay import Relay

pytestmark = pytest.mark.integration

# The contract's bound for a vanished instance is 20 s with default settings; tests allow
# a margin for a loaded two-core machine.
FAILOVER_BOUND = 20.0
MARGIN = 20.0


async def all_running(deployment: Deployment, ids: list[str]) -> dict[str, dict]:
    found = await rows(deployment.settings.database_url)
    if all(found.get(i, {}).get("state") == "running" and found[i]["owner"] for i in ids):
        return found
    return {}


async def spread_over(deployment: Deployment, ids: list[str], names: set[str]) -> dict:
    """The rows, once every config runs and every named instance holds some of them."""
    found = await all_running(deployment, ids)
    return found if {r["owner"] for r in found.values()} == names else {}


async def publish(deployment: Deployment, count: int, *, interval: float) -> list[str]:
    ids = [f"cfg-{n:03d}" for n in range(count)]
    for config_id in ids:
        await deployment.put(config_id, interval=interval,
                             channel=f"shop-{hash(config_id) % 7}")
    return ids


def spawn_group(deployment: Deployment, names: list[str], **env: str) -> dict:
    return {name: deployment.spawn_instance(instance_id=name, **env) for name in names}


async def stop_all(deployment: Deployment, processes: dict) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        await asyncio.to_thread(process.wait, 60)


async def relayed_database(deployment: Deployment) -> tuple[Relay, str]:
    """A started relay in front of the deployment's PostgreSQL, and the URL through it."""
    port = int(deployment.settings.database_url.rsplit(":", 1)[1].split("/")[0])
    relay = Relay(target_port=port)
    await relay.start()
    return relay, deployment.settings.database_url.replace(f":{port}/",
                                                           f":{relay.listen_port}/")


async def seconds_to_exit_after_sigterm(process, what: str) -> float:
    """SIGTERM two seconds into an outage; the process must exit 0. Returns how long it took."""
    await asyncio.sleep(2.0)
    stopped_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 60)
    elapsed = time.monotonic() - stopped_at
    print(f"exit {elapsed:.1f} s after SIGTERM with {what}")
    assert code == 0
    return elapsed


async def every_start_has_one_end(deployment: Deployment) -> dict[str, int]:
    counts = end_counts(deployment.events)
    if all(count == 1 for count in counts.values()):
        return counts
    return {}


async def test_three_instances_run_each_of_200_configs_exactly_once_spread_over_them(
    deployment: Deployment,
) -> None:
    processes = spawn_group(deployment, ["a", "b", "c"])
    ids = await publish(deployment, 200, interval=2.0)

    async def spread_and_running() -> dict[str, dict]:
        found = await all_running(deployment, ids)
        return found if {r["owner"] for r in found.values()} == {"a", "b", "c"} else {}

    await wait_for(spread_and_running, timeout=180, what="all 200 configs running on a, b, c")
    await asyncio.sleep(3.0)
    found = await wait_for(spread_and_running, timeout=30, what="a steady state")

    owners = collections.Counter(row["owner"] for row in found.values())
    assert set(owners) == {"a", "b", "c"}, owners
    assert all(count >= 20 for count in owners.values()), owners
    # Instances joined one after another, so some configs moved (`reassigned`) on the way;
    # what counts is one active run per config, the one the table names (once the relays
    # delivered the last `started` events), and no overlap.
    def events_agree_with_the_table() -> bool:
        active = active_runs(deployment.events)
        return {i: found[i]["run_id"] for i in ids} == {i: active.get(i) for i in ids}

    await wait_for(events_agree_with_the_table, timeout=20,
                   what="the events naming the runs the table names",
                   show=lambda: {i: (found[i]["run_id"], active_runs(deployment.events).get(i))
                                 for i in ids
                                 if found[i]["run_id"] != active_runs(deployment.events).get(i)})
    assert deployment.source.overlaps() == []

    await stop_all(deployment, processes)
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="an end event for every run")


async def test_killed_instance_configs_run_elsewhere_within_the_bound_without_overlap(
    deployment: Deployment,
) -> None:
    processes = spawn_group(deployment, ["a", "b", "c"])
    ids = await publish(deployment, 60, interval=1.0)
    found = await wait_for(lambda: spread_over(deployment, ids, {"a", "b", "c"}), timeout=90,
                           what="all configs running on a, b and c")
    await asyncio.sleep(2.0)
    found = await wait_for(lambda: spread_over(deployment, ids, {"a", "b", "c"}), timeout=30,
                           what="a steady state")
    victim = collections.Counter(r["owner"] for r in found.values()).most_common(1)[0][0]
    orphaned = {i: r["run_id"] for i, r in found.items() if r["owner"] == victim}

    killed_at = time.monotonic()
    processes[victim].send_signal(signal.SIGKILL)

    def moved() -> bool:
        active = active_runs(deployment.events)
        return all(active.get(i) not in (None, run) for i, run in orphaned.items())

    await wait_for(moved, timeout=FAILOVER_BOUND + MARGIN, what="orphaned configs restarted")
    elapsed = time.monotonic() - killed_at
    print(f"failover after SIGKILL took {elapsed:.1f} s for {len(orphaned)} configs")

    # Every vanished run was ended by its new owner, in the record, as lease-expired.
    for config_id, run_id in orphaned.items():
        ends = [e for e in deployment.events_of(config_id) if e["type"] != "pull.task.started"
                and e["data"]["run_id"] == run_id]
        assert [(e["data"]["reason"], e["data"]["instance_id"]) for e in ends] == [
            ("lease-expired", victim)
        ]
        assert ends[0]["source"] != f"reconciler/{victim}"
    await asyncio.sleep(2.0)
    assert deployment.source.overlaps() == []

    await stop_all(deployment, processes)
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="one end event per run")


async def test_frozen_instance_is_replaced_and_after_thawing_sends_and_publishes_nothing(
    deployment: Deployment,
) -> None:
    processes = spawn_group(deployment, ["a", "b"])
    ids = await publish(deployment, 30, interval=0.5)
    await wait_for(lambda: spread_over(deployment, ids, {"a", "b"}), timeout=90,
                   what="all configs running on a and b")
    await asyncio.sleep(1.0)
    found = await wait_for(lambda: spread_over(deployment, ids, {"a", "b"}), timeout=30,
                           what="a steady state")
    frozen = {i: r["run_id"] for i, r in found.items() if r["owner"] == "a"}
    assert frozen

    processes["a"].send_signal(signal.SIGSTOP)

    def taken_over() -> bool:
        return all(
            any(e["data"]["run_id"] == run and e["data"]["reason"] == "lease-expired"
                for e in deployment.events_of(i, "stopped"))
            for i, run in frozen.items()
        )

    await wait_for(taken_over, timeout=FAILOVER_BOUND + MARGIN,
                   what="the frozen runs ended as lease-expired")
    await wait_for(lambda: all(active_runs(deployment.events).get(i) not in (None, run)
                               for i, run in frozen.items()),
                   timeout=FAILOVER_BOUND + MARGIN, what="frozen configs running elsewhere")

    thawed_at = time.monotonic()
    orders_before = len(deployment.orders)
    processes["a"].send_signal(signal.SIGCONT)
    await asyncio.sleep(8.0)

    stale_runs = set(frozen.values())
    late = [r for r in deployment.source.requests()
            if r.run_id in stale_runs and r.started >= thawed_at]
    assert late == []
    published = [r for r in deployment.orders[orders_before:]
                 if dict(r.headers).get("run-id", b"").decode() in stale_runs]
    assert published == []
    for config_id, run_id in frozen.items():
        ends = [e for e in deployment.events_of(config_id)
                if e["type"] != "pull.task.started" and e["data"]["run_id"] == run_id]
        assert len(ends) == 1, ends
    assert deployment.source.overlaps() == []

    await stop_all(deployment, processes)
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="one end event per run")


async def test_instance_cut_off_from_kafka_hands_its_configs_over_and_stops_its_runs(
    deployment: Deployment, kafka_relay,
) -> None:
    relay = await kafka_relay()
    relay_port = relay.listen_port
    processes = {
        "a": deployment.spawn_instance(
            instance_id="a", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{relay_port}"
        ),
        "b": deployment.spawn_instance(instance_id="b"),
    }
    ids = await publish(deployment, 30, interval=0.5)
    await wait_for(lambda: spread_over(deployment, ids, {"a", "b"}), timeout=90,
                   what="all configs running on a and b")
    await asyncio.sleep(1.0)
    found = await wait_for(lambda: spread_over(deployment, ids, {"a", "b"}), timeout=30,
                           what="a steady state")
    cut_off = {i: r["run_id"] for i, r in found.items() if r["owner"] == "a"}
    assert cut_off

    cut_at = time.monotonic()
    relay.cut()

    await wait_for(lambda: all(active_runs(deployment.events).get(i) not in (None, run)
                               for i, run in cut_off.items()),
                   timeout=FAILOVER_BOUND + MARGIN, what="configs moved to b")
    print(f"hand-over after cutting a off from Kafka took {time.monotonic() - cut_at:.1f} s")
    await asyncio.sleep(2.0)
    stale = set(cut_off.values())
    assert not any(r.run_id in stale and r.started > time.monotonic() - 1.5
                   for r in deployment.source.requests())
    assert deployment.source.overlaps() == []

    relay.restore()
    await stop_all(deployment, processes)
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="one end event per run")


async def test_instance_cut_off_from_postgresql_stops_its_runs_before_their_leases_expire(
    deployment: Deployment, stack,
) -> None:
    relay, relayed_url = await relayed_database(deployment)
    try:
        process = deployment.spawn_instance(instance_id="a", DATABASE_URL=relayed_url)
        ids = await publish(deployment, 10, interval=0.3)
        found = await wait_for(lambda: all_running(deployment, ids), timeout=90,
                               what="all configs running")
        await asyncio.sleep(1.0)
        runs = {i: r["run_id"] for i, r in found.items()}

        relay.cut()
        cut_at = time.monotonic()
        leases = await rows(deployment.settings.database_url)
        # A run that ended on its own just before the cut holds no lease: nothing to check.
        expiry = {i: cut_at + leases[i]["lease_left"] for i in ids
                  if leases[i]["lease_left"] is not None and leases[i]["run_id"] == runs[i]}

        await asyncio.sleep(12.0)
        for config_id, run_id in runs.items():
            if config_id not in expiry:
                continue
            last = max(r.ended for r in deployment.source.requests_for(config_id)
                       if r.run_id == run_id)
            assert last < expiry[config_id], (config_id, last - cut_at,
                                              expiry[config_id] - cut_at)

        relay.restore()
        await wait_for(lambda: all(active_runs(deployment.events).get(i) not in (None, run)
                                   for i, run in runs.items()),
                       timeout=40, what="configs running again after the database is back")
        ends = [e for i, run in runs.items() for e in deployment.events_of(i)
                if e["type"] == "pull.task.stopped" and e["data"]["run_id"] == run]
        assert {e["data"]["reason"] for e in ends} == {"lease-lost"}
        assert len(ends) == len(runs)
        assert deployment.source.overlaps() == []

        await stop_all(deployment, {"a": process})
        await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                       what="one end event per run")
    finally:
        await relay.stop()


async def test_sigterm_hands_configs_to_the_successor_within_five_seconds(
    deployment: Deployment,
) -> None:
    processes = spawn_group(deployment, ["a", "b"])
    ids = await publish(deployment, 30, interval=0.5)
    await wait_for(lambda: spread_over(deployment, ids, {"a", "b"}), timeout=90,
                   what="all configs running on a and b")
    await asyncio.sleep(1.0)
    found = await wait_for(lambda: spread_over(deployment, ids, {"a", "b"}), timeout=30,
                           what="a steady state")
    leaving = {i: r["run_id"] for i, r in found.items() if r["owner"] == "a"}

    stopped_at = time.monotonic()
    processes["a"].send_signal(signal.SIGTERM)
    await wait_for(lambda: all(active_runs(deployment.events).get(i) not in (None, run)
                               for i, run in leaving.items()),
                   timeout=5.0 + MARGIN, what="configs running on b")
    elapsed = time.monotonic() - stopped_at
    print(f"hand-over after SIGTERM took {elapsed:.1f} s for {len(leaving)} configs")
    assert await asyncio.to_thread(processes["a"].wait, 30) == 0
    for config_id, run_id in leaving.items():
        ends = [e["data"]["reason"] for e in deployment.events_of(config_id)
                if e["type"] != "pull.task.started" and e["data"]["run_id"] == run_id]
        assert ends in (["shutdown"], ["reassigned"])
    assert deployment.source.overlaps() == []

    await stop_all(deployment, processes)
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="one end event per run")


async def test_sigterm_with_the_broker_silently_unreachable_exits_within_the_shutdown_bound(
    deployment: Deployment, kafka_relay,
) -> None:
    relay = await kafka_relay()
    relay_port = relay.listen_port
    process = deployment.spawn_instance(
        instance_id="a", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{relay_port}",
        RECONCILER_SHUTDOWN_TIMEOUT_SECONDS="15",
    )
    ids = await publish(deployment, 5, interval=0.5)
    await wait_for(lambda: all(active_runs(deployment.events).get(i) for i in ids),
                   timeout=90, what="every config running")

    relay.freeze()  # packets dropped: every call to the broker waits for its timeout
    elapsed = await seconds_to_exit_after_sigterm(process, "the broker unreachable")
    # The budget (15 s) plus flushing and leaving; not the minutes faust's consumer
    # thread waits for the broker.
    assert elapsed < 15 + 10, deployment.log_tail("a", lines=30)
    # The runs ended and released their leases: the database was reachable.
    found = await rows(deployment.settings.database_url)
    assert {found[i]["state"] for i in ids} == {"stopped"}
    assert all(found[i]["owner"] is None for i in ids)


async def test_sigterm_with_postgresql_silently_unreachable_exits_within_the_shutdown_bound(
    deployment: Deployment,
) -> None:
    relay, relayed_url = await relayed_database(deployment)
    try:
        process = deployment.spawn_instance(
            instance_id="a", DATABASE_URL=relayed_url, RECONCILER_SHUTDOWN_TIMEOUT_SECONDS="15",
        )
        ids = await publish(deployment, 5, interval=0.5)
        await wait_for(lambda: all_running(deployment, ids), timeout=90,
                       what="every config running")

        relay.freeze()  # packets dropped: every query waits for the database timeout
        elapsed = await seconds_to_exit_after_sigterm(process, "PostgreSQL unreachable")
        # The budget plus closing what is left; each step that waits on the database gives
        # up within the budget (sending the last events once waited 20 s past it).
        assert elapsed < 15 + 4, deployment.log_tail("a", lines=30)
    finally:
        await relay.stop()


async def test_sigterm_with_the_telemetry_endpoint_silent_exits_within_the_shutdown_bound(
    deployment: Deployment,
) -> None:
    # Accepts connections (the kernel does) and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        process = deployment.spawn_instance(
            instance_id="a", RECONCILER_SHUTDOWN_TIMEOUT_SECONDS="5",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}",
            OTEL_METRICS_EXPORTER="otlp",
        )
        ids = await publish(deployment, 3, interval=0.5)
        await wait_for(lambda: all_running(deployment, ids), timeout=90,
                       what="every config running")
        elapsed = await seconds_to_exit_after_sigterm(process, "the OTLP endpoint silent")
        # The exporters' own timeout is 10 s; the budget bounds the last export.
        assert elapsed < 5 + 3, deployment.log_tail("a", lines=30)
    finally:
        silent.close()


async def test_static_membership_lets_a_quick_restart_move_no_partition(
    deployment: Deployment,
) -> None:
    processes = {
        name: deployment.spawn_instance(instance_id=name, RECONCILER_STATIC_MEMBER_ID=name)
        for name in ("a", "b")
    }
    ids = await publish(deployment, 20, interval=0.5)

    async def spread() -> dict[str, dict]:
        found = await all_running(deployment, ids)
        return found if {r["owner"] for r in found.values()} == {"a", "b"} else {}

    found = await wait_for(spread, timeout=90, what="configs running on a and b")
    await asyncio.sleep(2.0)
    found = await wait_for(spread, timeout=30, what="a steady state")
    on_b = {i: r["run_id"] for i, r in found.items() if r["owner"] == "b"}
    on_a = {i for i, r in found.items() if r["owner"] == "a"}

    # The second member's first join may have moved configs; the restart must move none.
    events_before = len(deployment.events)
    assert await asyncio.to_thread(deployment.terminate, processes["a"]) == 0
    processes["a"] = deployment.spawn_instance(instance_id="a", RECONCILER_STATIC_MEMBER_ID="a")

    async def back_on_a() -> bool:
        now = await all_running(deployment, ids)
        return bool(now) and {i for i, r in now.items() if r["owner"] == "a"} == on_a

    await wait_for(back_on_a, timeout=30, what="a's configs running on a again")
    assert {i: active_runs(deployment.events).get(i) for i in on_b} == on_b
    reassigned = [(e["source"], e["time"], e["data"]["config_id"])
                  for e in deployment.events[events_before:]
                  if e["data"]["reason"] == "reassigned"]
    assert reassigned == []
    assert deployment.source.overlaps() == []
    await stop_all(deployment, processes)


async def test_of_two_instances_with_one_static_member_id_the_older_stops_with_an_error(
    deployment: Deployment,
) -> None:
    older = deployment.spawn_instance(instance_id="a", RECONCILER_STATIC_MEMBER_ID="member-x")
    ids = await publish(deployment, 6, interval=0.5)
    await wait_for(lambda: all_running(deployment, ids), timeout=90,
                   what="every config running on a")
    newer = deployment.spawn_instance(instance_id="b", RECONCILER_STATIC_MEMBER_ID="member-x")

    # A heartbeat (every lease renewal, 3 s) finds the newer process with the same id.
    code = await asyncio.to_thread(older.wait, 60)
    assert code == 1, deployment.log_tail("a", lines=30)
    with open(deployment.log_path("a"), errors="replace") as log:
        said = log.read()
    assert "instance b started later with the same RECONCILER_STATIC_MEMBER_ID (member-x)" \
        in said
    assert newer.poll() is None

    async def all_on_b() -> bool:
        found = await all_running(deployment, ids)
        return bool(found) and {r["owner"] for r in found.values()} == {"b"}

    await wait_for(all_on_b, timeout=60, what="every config running on b")
    assert deployment.source.overlaps() == []
    await stop_all(deployment, {"b": newer})
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="one end event per run")
