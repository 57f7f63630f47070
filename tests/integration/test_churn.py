"""Churn: many configs changing fast while instances come and go, then convergence.

The first test drives `reconciler run` processes with a seeded stream of random changes
to many configs and kills instances in the middle of it; the last record published for each
config is its desired state, so the expected end state is known without asking the product.
The second keeps instances in this process so that their loops can be made slow to stop and
their registries of runs read directly, and changes group membership back to back.

Overlap is measured at the sample order source, as in the failover tests. The sizes of the
first test come from the environment so that `make chaos` can run it longer:

- `CHAOS_OPERATIONS`: changes published (default 1000);
- `CHAOS_CONFIGS`: configs they are spread over (default 100);
- `CHAOS_ROUNDS`: instances killed and restarted while they are published (default 1);
- `CHAOS_SECONDS`: the time the changes are spread over, at least (default 5);
- `CHAOS_SEED`: the seed of every random choice of both tests (default 1).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest

from reconciler.instance import Instance
from tests.integration.harness import (
    Deployment,
    active_runs,
    end_counts,
    rows,
    runs_without_one_end,
    wait_for,
)
from tests.integration.test_failover import every_start_has_one_end, spawn_group, stop_all

pytestmark = pytest.mark.integration

OPERATIONS = int(os.environ.get("CHAOS_OPERATIONS", "1000"))
CONFIGS = int(os.environ.get("CHAOS_CONFIGS", "100"))
ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "1"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "5"))
SEED = int(os.environ.get("CHAOS_SEED", "1"))

# The contract's convergence bound for this test, plus a margin for a loaded two-core
# machine; a killed instance's configs alone may take the 20 s failover bound.
CONVERGENCE_BOUND = 30.0
MARGIN = 15.0
# How long a killed instance stays away before it is started again under the same id.
RESTART_AFTER = 1.5
# Orders per second and (channel, product) at the source: low, so that a first pull or a
# pull from a cleared cursor stays a page or two and the machine's cores go to the churn.
ORDER_RATE = 1.0

ACTIVE_STATES = ("starting", "running", "stopping")
INTERVALS = (1.0, 2.0, 3.0, 4.0)
TIMEOUTS = (None, 5.0, 10.0, 20.0)
CHANGES = {"enable": 25, "disable": 20, "interval": 15, "fields": 15, "delete": 10,
           "recreate": 15}


# ---- the random changes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    config_id: str
    # The fields of the whole desired state published (for `Deployment.put`); None: deleted.
    fields: dict[str, Any] | None


def fresh_fields(rng: random.Random, config_id: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "enabled": rng.random() < 0.6,
        "interval": rng.choice(INTERVALS),
        "channel": f"shop-{rng.randrange(5)}",
        "product": f"{config_id}.p{rng.randrange(3)}",
    }
    timeout = rng.choice(TIMEOUTS)
    if timeout is not None:
        fields["timeout"] = timeout
    return fields


def changed_fields(rng: random.Random, config_id: str, current: dict[str, Any]) -> dict:
    """Another of the fields a loop restarts for, the url aside."""
    fields = dict(current)
    which = rng.choice(("channel", "product", "timeout"))
    if which == "channel":
        fields["channel"] = f"shop-{rng.randrange(5)}"
    elif which == "product":
        fields["product"] = f"{config_id}.p{rng.randrange(3)}"
    else:
        fields.pop("timeout", None)
        timeout = rng.choice(TIMEOUTS)
        if timeout is not None:
            fields["timeout"] = timeout
    return fields


def next_change(rng: random.Random, desired: dict[str, dict | None], ids: list[str]) -> Change:
    config_id = rng.choice(ids)
    current = desired.get(config_id)
    kind = rng.choices(list(CHANGES), weights=list(CHANGES.values()))[0]
    if current is None and kind != "delete":
        kind = "recreate"  # only a whole new record brings back a deleted config
    if kind == "delete":
        return Change(kind, config_id, None)
    if kind == "recreate":
        return Change(kind, config_id, fresh_fields(rng, config_id))
    fields = dict(current)
    if kind == "enable":
        fields["enabled"] = True
    elif kind == "disable":
        fields["enabled"] = False
    elif kind == "interval":
        fields["interval"] = rng.choice([i for i in INTERVALS if i != fields["interval"]])
    else:
        fields = changed_fields(rng, config_id, current)
    return Change(kind, config_id, fields)


# ---- what happened ---------------------------------------------------------------------------


def unended_runs(events: list[dict]) -> list[tuple[str, str]]:
    """(config id, run id) of every run with a `started` event and no end event yet."""
    ended = {e["data"]["run_id"] for e in events if e["type"] != "pull.task.started"}
    return [(e["subject"], e["data"]["run_id"]) for e in events
            if e["type"] == "pull.task.started" and e["data"]["run_id"] not in ended]


def disagreements(events: list[dict], found: dict[str, dict], enabled: set[str]) -> list[str]:
    """How the events and the table differ from `enabled` running once each; [] if not."""
    problems = []
    unended = collections.Counter(config_id for config_id, _ in unended_runs(events))
    for config_id, count in sorted(unended.items()):
        if count > 1:
            problems.append(f"{config_id}: {count} runs without an end event")
    if set(unended) != enabled:
        problems.append(f"active by events but not enabled: {sorted(set(unended) - enabled)}; "
                        f"enabled but not active: {sorted(enabled - set(unended))}")
    active = active_runs(events)
    for config_id in sorted(enabled):
        row = found.get(config_id) or {}
        if row.get("state") != "running" or row.get("run_id") != active.get(config_id):
            problems.append(f"{config_id}: row {row.get('state')} run {row.get('run_id')} "
                            f"owner {row.get('owner')}, events say run {active.get(config_id)}")
    for config_id, row in sorted(found.items()):
        if config_id not in enabled and row["state"] in ACTIVE_STATES:
            problems.append(f"{config_id}: not enabled but row {row['state']} "
                            f"run {row['run_id']} owner {row['owner']}")
    return problems


async def converged(deployment: Deployment, enabled: set[str]) -> bool:
    # The events are in memory; the table is read only once they agree, to keep polls light.
    unended = [config_id for config_id, _ in unended_runs(deployment.events)]
    if len(unended) != len(enabled) or set(unended) != enabled:
        return False
    found = await rows(deployment.settings.database_url)
    return not disagreements(deployment.events, found, enabled)


async def explain(deployment: Deployment, enabled: set[str], *, limit: int = 40) -> str:
    found = await rows(deployment.settings.database_url)
    problems = disagreements(deployment.events, found, enabled)
    return f"{len(problems)} disagreements:\n" + "\n".join(problems[:limit])


async def converge(deployment: Deployment, enabled: set[str], *, timeout: float) -> None:
    """Wait for `converged`, saying every 10 s what still disagrees; fail with it at the end."""
    began = time.monotonic()
    report_at = 10.0
    while not await converged(deployment, enabled):
        waited = time.monotonic() - began
        if waited > timeout:
            raise AssertionError(f"not converged after {timeout} s; "
                                 f"{await explain(deployment, enabled)}")
        if waited >= report_at:
            print(f"after {waited:.0f} s, {await explain(deployment, enabled, limit=5)}")
            report_at += 10.0
        await asyncio.sleep(0.1)


async def spread_and_running(
    deployment: Deployment, ids: list[str], *, owners: set[str]
) -> bool:
    found = await rows(deployment.settings.database_url)
    if not all(found.get(i, {}).get("state") == "running" for i in ids):
        return False
    return {found[i]["owner"] for i in ids} == owners


def event_counts(events: list[dict]) -> dict[str, int]:
    counts = collections.Counter(e["type"].rsplit(".", 1)[1] for e in events)
    return {kind: counts[kind] for kind in ("started", "stopped", "failed")}


def stop_reasons(events: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(e["data"]["reason"] for e in events
                                    if e["type"] == "pull.task.stopped"))


# ---- killing and restarting --------------------------------------------------------------


@dataclass
class Killer:
    """Kills one live instance at a time and starts it again, same id, `RESTART_AFTER` later."""

    deployment: Deployment
    processes: dict[str, subprocess.Popen]
    rng: random.Random
    kills: int = 0

    def __post_init__(self) -> None:
        self._away: set[str] = set()
        self._killed: collections.Counter[str] = collections.Counter()
        self._restarts: list[asyncio.Task] = []

    async def kill_one(self) -> tuple[str, int]:
        """Kill an instance that is not away; return it and how many rows name it owner.

        The victim is one of those killed least often: a process just restarted may not
        have taken over its predecessor's configs yet, and killing it again tests less.
        """
        present = sorted(set(self.processes) - self._away)
        fewest = min(self._killed[name] for name in present)
        victim = self.rng.choice([name for name in present if self._killed[name] == fewest])
        self._away.add(victim)
        self._killed[victim] += 1
        found = await rows(self.deployment.settings.database_url)
        held = sum(1 for row in found.values()
                   if row["owner"] == victim and row["state"] in ACTIVE_STATES)
        process = self.processes[victim]
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
        self.kills += 1
        self._restarts.append(asyncio.create_task(self._restart(victim)))
        return victim, held

    async def _restart(self, name: str) -> None:
        await asyncio.sleep(RESTART_AFTER)
        self.processes[name] = self.deployment.spawn_instance(instance_id=name)
        self._away.discard(name)

    async def all_back(self) -> None:
        await asyncio.gather(*self._restarts)


async def publish_changes(
    deployment: Deployment, desired: dict[str, dict | None], *, killer: Killer,
    rng: random.Random,
) -> None:
    """Publish `OPERATIONS` changes paced over `SECONDS`, killing at evenly spaced points.

    Each change is acknowledged by the broker before the next one goes out, so the last
    change of a config is the last record of its key: `desired` is updated to it.
    """
    ids = sorted(desired)
    kill_at = {OPERATIONS * (k + 1) // (ROUNDS + 1) for k in range(ROUNDS)}
    began = time.monotonic()
    for n in range(OPERATIONS):
        if n in kill_at:
            victim, held = await killer.kill_one()
            print(f"killed {victim}, owner of {held} active rows, after {n} changes")
        ahead = began + SECONDS * n / OPERATIONS - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
        change = next_change(rng, desired, ids)
        if change.fields is None:
            await deployment.delete(change.config_id)
        else:
            await deployment.put(change.config_id, **change.fields)
        desired[change.config_id] = change.fields


@pytest.mark.timeout(300 + OPERATIONS // 20)
async def test_churn_over_100_configs_with_an_instance_killed_midway_converges_without_overlap(
    deployment: Deployment,
) -> None:
    deployment.source.rate = ORDER_RATE
    rng = random.Random(SEED)
    ids = [f"churn-{n:03d}" for n in range(CONFIGS)]
    processes = spawn_group(deployment, ["a", "b", "c"])
    killer = Killer(deployment, processes, rng=random.Random(SEED + 1))
    # The churn begins from every config running, spread over all three instances, so
    # that a kill always takes runs with it.
    desired: dict[str, dict | None] = {}
    for config_id in ids:
        desired[config_id] = {**fresh_fields(rng, config_id), "enabled": True}
        await deployment.put(config_id, **desired[config_id])
    await wait_for(lambda: spread_and_running(deployment, ids, owners={"a", "b", "c"}),
                   timeout=90, what="every config running on a, b and c")

    published_at = time.monotonic()
    convergence: float | None = None
    overlaps: list = []
    try:
        await publish_changes(deployment, desired, killer=killer, rng=rng)
        settled_at = time.monotonic()
        await killer.all_back()
        enabled = {i for i, fields in desired.items()
                   if fields is not None and fields["enabled"]}
        print(f"published {OPERATIONS} changes over {len(desired)} configs in "
              f"{settled_at - published_at:.1f} s (seed {SEED}); {len(enabled)} end enabled")

        await converge(deployment, enabled, timeout=CONVERGENCE_BOUND + MARGIN)
        convergence = time.monotonic() - settled_at
        print(f"converged {convergence:.1f} s after the last change was acknowledged")
        # Still so a little later: nothing left over starts or stops behind the steady state.
        await asyncio.sleep(3.0)
        steady = await explain(deployment, enabled)
        overlaps = deployment.source.overlaps()

        await stop_all(deployment, processes)
        exit_codes = {name: process.returncode for name, process in processes.items()}
        await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                       what="exactly one end event for every run",
                       show=lambda: runs_without_one_end(deployment))
    finally:
        counts = event_counts(deployment.events)
        print(f"chaos summary: operations={OPERATIONS} configs={CONFIGS} "
              f"kills={killer.kills} started={counts['started']} "
              f"stopped={counts['stopped']} failed={counts['failed']} "
              f"overlaps={len(deployment.source.overlaps())} convergence_seconds="
              f"{'none' if convergence is None else f'{convergence:.1f}'}")
        print(f"stop reasons: {stop_reasons(deployment.events)}")

    assert steady.startswith("0 disagreements"), steady
    assert overlaps == []
    assert exit_codes == {name: 0 for name in processes}
    assert convergence <= CONVERGENCE_BOUND + MARGIN


# ---- back-to-back rebalances, in this process ------------------------------------------


@dataclass
class SlowPublishing:
    """Holds each page of orders for a random 1 to 3 s before publishing it, while `on`.

    Publishing is the part of a pull that a stop lets finish, so a loop caught in it
    outlives the stop bound. The random hold keeps the loops out of step with each other,
    so that a stop finds each of them at a different point of its pull.
    """

    rng: random.Random
    on: bool = True

    def wrap(self, instance: Instance, *, orders_topic: str) -> None:
        orders = instance.orders
        send_all = orders.send_all

        async def slow_send_all(scope, topic, records, **options):
            if records and self.on:
                await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            await send_all(scope, topic, records, **options)

        orders.send_all = slow_send_all


async def start_slow_instance(
    deployment: Deployment, *, instance_id: str, slow: SlowPublishing
) -> Instance:
    instance = await deployment.start_instance(instance_id=instance_id, stop_timeout_seconds=0.5)
    slow.wrap(instance, orders_topic=deployment.topics.orders)
    return instance


def registry_disagreements(instances: list[Instance], found: dict[str, dict]) -> list[str]:
    """Live instances whose registry of runs is not what the table says they run, and runs
    the table gives to no live instance (a stopped instance's run whose end is not recorded).
    """
    live_ids = {instance.instance_id for instance in instances}
    problems = [f"{i}: row {row['state']} owned by {row['owner']}, not a live instance"
                for i, row in sorted(found.items())
                if row["state"] in ACTIVE_STATES and row["owner"] not in live_ids]
    for instance in instances:
        registry = set(instance.supervisor.runs)
        recorded = {i for i, row in found.items()
                    if row["owner"] == instance.instance_id and row["state"] == "running"}
        if registry != recorded:
            problems.append(f"{instance.instance_id}: only in the registry "
                            f"{sorted(registry - recorded)}, only in the table "
                            f"{sorted(recorded - registry)}")
    return problems


async def count_stopping_rows(database_url: str, seen: list[int]) -> None:
    """Sample how many rows are `stopping` (a stop outlived its bound) until cancelled."""
    while True:
        found = await rows(database_url)
        seen.append(sum(1 for row in found.values() if row["state"] == "stopping"))
        await asyncio.sleep(0.2)


async def test_back_to_back_rebalances_with_slow_stopping_loops_keep_registries_true(
    deployment: Deployment, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    deployment.source.rate = ORDER_RATE
    prefix = deployment.settings.topic_prefix
    rng = random.Random(SEED)
    slow = SlowPublishing(rng=random.Random(SEED + 1))
    names = (f"{prefix}-{n}" for n in range(100))
    live = [await start_slow_instance(deployment, instance_id=next(names), slow=slow)
            for _ in range(3)]
    ids = [f"slow-{n:02d}" for n in range(40)]
    for config_id in ids:
        await deployment.put(config_id, interval=rng.choice((0.5, 1.0)),
                             channel=f"shop-{rng.randrange(5)}")
    await wait_for(lambda: set(active_runs(deployment.events)) == set(ids), timeout=60,
                   what="every config running")

    # Six membership changes, each as soon as the group has answered the one before: one
    # instance leaves and the others take its partitions, then a new one joins and takes
    # some away again, so that loops of the remaining instances stop slowly too.
    stopping: list[int] = []
    sampler = asyncio.create_task(count_stopping_rows(deployment.settings.database_url,
                                                      stopping))
    partitions = set(range(deployment.settings.config_partitions))
    changed_at = time.monotonic()
    try:
        for _ in range(3):
            await deployment.stop_instance(live.pop(rng.randrange(len(live))))
            await wait_for(lambda: set().union(*(i.assigned for i in live)) == partitions,
                           timeout=30, what="the partitions of the instance that left taken")
            live.append(await start_slow_instance(deployment, instance_id=next(names),
                                                  slow=slow))
        print(f"six membership changes took {time.monotonic() - changed_at:.1f} s")

        async def settled() -> bool:
            if len(unended_runs(deployment.events)) != len(ids):
                return False
            found = await rows(deployment.settings.database_url)
            return not (disagreements(deployment.events, found, set(ids))
                        or registry_disagreements(live, found))

        try:
            await wait_for(settled, timeout=CONVERGENCE_BOUND + MARGIN, what="a settled group")
        except AssertionError as timed_out:
            found = await rows(deployment.settings.database_url)
            problems = (disagreements(deployment.events, found, set(ids))
                        + registry_disagreements(live, found))
            raise AssertionError(f"{timed_out}:\n" + "\n".join(problems)) from None
    finally:
        sampler.cancel()
    print(f"settled {time.monotonic() - changed_at:.1f} s after the first change; at most "
          f"{max(stopping, default=0)} rows stopping at once; stop reasons so far: "
          f"{stop_reasons(deployment.events)}")

    assert max(stopping, default=0) > 0, "no stop outlived its bound: the test tested nothing"
    assert deployment.source.overlaps() == []
    assert max(end_counts(deployment.events).values()) <= 1

    # Quick stops at the end, so that every run ends by its own instance's shutdown.
    slow.on = False
    await asyncio.sleep(3.5)
    for instance in list(live):
        await deployment.stop_instance(instance)
    await wait_for(lambda: every_start_has_one_end(deployment), timeout=30,
                   what="exactly one end event for every run",
                   show=lambda: runs_without_one_end(deployment))
    assert deployment.source.overlaps() == []
