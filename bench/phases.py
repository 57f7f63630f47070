"""The product's phases: reaction, burst, churn, capacity and pull rate.

Each phase makes its own deployment (topics, database, sample source), starts one
`reconciler run` instance, does its measurements and takes everything down again, so phases
can run alone or in any order. Sizes come from `Sizes` (see `bench.__main__`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

import asyncpg

from bench import processes
from bench.churn import ActiveRuns, ChangeStream, LagTracker, drive
from bench.deployment import Change, Context, Deployment, ProductSystem, wait_until
from bench.profiler import Profile
from bench.stats import latency_summary

log = logging.getLogger(__name__)

# The instance's lease timing (its defaults), for reading renewals from the table.
LEASE_SECONDS = 10.0
# A capacity start that has seen no new config start for this long has reached its limit.
STALL_SECONDS = 120.0
MIB = 1024 * 1024


@dataclass
class Sizes:
    reaction_samples: int = 200
    reaction_load: int = 10_000
    reaction_interval: float = 300.0
    burst_configs: int = 10_000
    churn_configs: int = 5_000
    churn_rate: float = 1_000.0
    churn_seconds: float = 60.0
    churn_interval: float = 20.0
    capacity_configs: int = 50_000
    capacity_interval: float = 300.0
    idle_seconds: float = 30.0
    pull_steps: tuple[int, ...] = (10, 40, 160)
    pull_seconds: float = 20.0
    pull_interval: float = 0.05
    compare_configs: int = 1_000
    compare_samples: int = 200
    compare_rate: float = 100.0
    compare_seconds: float = 30.0
    compare_interval: float = 5.0
    compare_idle_seconds: float = 20.0
    scan_seconds: float = 5.0
    # Seconds to let first pulls (jitter of at most 5 s) pass before measuring.
    settle_seconds: float = 7.0
    seed: int = 1


QUICK = dict(
    reaction_samples=20, reaction_load=200, burst_configs=200, churn_configs=200,
    churn_rate=50.0, churn_seconds=5.0, churn_interval=5.0, capacity_configs=500,
    idle_seconds=5.0, pull_steps=(10, 40), pull_seconds=5.0, compare_configs=100,
    compare_samples=10, compare_rate=20.0, compare_seconds=5.0, compare_idle_seconds=3.0,
    settle_seconds=6.0,
)


@contextlib.asynccontextmanager
async def product_deployment(context: Context, name: str, *, source_rate: float,
                             settings: dict[str, str] | None = None):
    deployment = Deployment(context, name, source_rate=source_rate)
    system = ProductSystem(deployment, settings=settings)
    try:
        await deployment.open(events_topic=deployment.topics.task_events)
        await system.start()
        yield deployment, system
    finally:
        try:
            await system.stop()
        finally:
            await deployment.close()


def _timeout_for(configs: int) -> float:
    return max(60.0, configs * 0.05)


async def start_all(deployment: Deployment, system, changes: list[Change], *,
                    stall: float | None = None, timeout: float | None = None) -> dict:
    """Apply changes that each ask for a start (or stop) and wait for every event, or
    until no new config was seen for `stall` seconds."""
    assert deployment.observer is not None
    kind = "started" if changes[0].enabled else "stopped"
    began = time.time()
    await system.apply(changes)
    published = time.time() - began
    found = await deployment.observer.all_of(
        [c.config_id for c in changes], kind, since=began,
        timeout=timeout or _timeout_for(len(changes)), stall=stall)
    latencies = [seen.arrived - began for seen in found.values()]
    return {
        "configs": len(changes),
        "observed": len(found),
        "publish_s": round(published, 3),
        "all_s": round(max(latencies), 3) if len(found) == len(changes) else None,
        "per_config": latency_summary(latencies),
    }


# ---- 1. reaction -------------------------------------------------------------------------


async def sample_reactions(deployment: Deployment, system, *, label: str, samples: int,
                           interval: float) -> dict:
    """One config at a time: enable → `started`, then disable → `stopped`."""
    assert deployment.observer is not None
    starts: list[float] = []
    stops: list[float] = []
    missed = 0
    for number in range(samples):
        config_id = f"{label}-{number}"
        try:
            began = time.time()
            await system.apply([Change(config_id, True, interval, 1)])
            seen = await deployment.observer.next_event(config_id, "started", since=began,
                                                        timeout=30)
            starts.append(seen.arrived - began)
            began = time.time()
            await system.apply([Change(config_id, False, interval, 2)])
            seen = await deployment.observer.next_event(config_id, "stopped", since=began,
                                                        timeout=30)
            stops.append(seen.arrived - began)
        except TimeoutError:
            missed += 1
        await asyncio.sleep(0.02)
    return {"start": latency_summary(starts), "stop": latency_summary(stops), "missed": missed}


async def reaction(context: Context, sizes: Sizes) -> dict:
    interval = sizes.reaction_interval
    async with product_deployment(context, "reaction", source_rate=1.0 / interval) as (
            deployment, system):
        idle = await sample_reactions(deployment, system, label="idle",
                                      samples=sizes.reaction_samples, interval=interval)
        background = [Change(f"bg-{n}", True, interval, 1) for n in range(sizes.reaction_load)]
        started = await start_all(deployment, system, background)
        await asyncio.sleep(sizes.settle_seconds)
        loaded = await sample_reactions(deployment, system, label="loaded",
                                        samples=sizes.reaction_samples, interval=interval)
        loaded["running_beside"] = started["observed"]
        loaded["background_started_s"] = started["all_s"]
        return {"interval_s": interval, "idle": idle, "loaded": loaded}


# ---- 2. burst ----------------------------------------------------------------------------


class Pipeline:
    """Where a burst is, read from the table every `poll` seconds: desired states written
    by the configs stream, runs the reconciles have recorded, events still in the outbox.
    Each stage's first moment at `count` shows which stage the burst waits on."""

    def __init__(self, database_url: str, *, count: int, enabled: bool,
                 poll: float = 0.2) -> None:
        self._url = database_url
        self._count = count
        self._enabled = enabled
        self._poll = poll
        self.began = time.time()
        self.reached: dict[str, float] = {}
        self.outbox_max = 0
        self.commits = 0

    async def run(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            first_commits = await self._commits(conn)
            while True:
                row = await conn.fetchrow(
                    """
                    SELECT count(*) FILTER (WHERE enabled = $1 AND config_version = $2)
                               AS written,
                           count(*) FILTER (WHERE state = ANY($3::text[])) AS recorded,
                           (SELECT count(*) FROM lifecycle_outbox) AS outbox
                    FROM pull_tasks
                    """,
                    self._enabled, 1 if self._enabled else 2,
                    ["running", "starting"] if self._enabled else ["stopped"],
                )
                now = time.time() - self.began
                self.outbox_max = max(self.outbox_max, row["outbox"])
                for stage in ("written", "recorded"):
                    if row[stage] >= self._count and stage not in self.reached:
                        self.reached[stage] = round(now, 3)
                self.commits = await self._commits(conn) - first_commits
                await asyncio.sleep(self._poll)
        finally:
            await conn.close()

    @staticmethod
    async def _commits(conn: asyncpg.Connection) -> int:
        return await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")

    def summary(self) -> dict:
        return {
            "desired_written_s": self.reached.get("written"),
            "runs_recorded_s": self.reached.get("recorded"),
            "outbox_depth_max": self.outbox_max,
            "commits_per_config": round(self.commits / self._count, 2),
        }


async def measured_burst(deployment: Deployment, system, changes: list[Change]) -> dict:
    pipeline = Pipeline(deployment.database_url, count=len(changes),
                        enabled=changes[0].enabled)
    watching = asyncio.create_task(pipeline.run())
    cpu_before = system.process.cpu_seconds()
    result = await start_all(deployment, system, changes)
    result["instance_cpu_s"] = round(system.process.cpu_seconds() - cpu_before, 2)
    await asyncio.sleep(0.5)
    watching.cancel()
    await asyncio.gather(watching, return_exceptions=True)
    result["pipeline"] = pipeline.summary()
    return result


async def burst(context: Context, sizes: Sizes, *, profile_dir=None) -> dict:
    interval = sizes.reaction_interval
    count = sizes.burst_configs
    async with product_deployment(context, "burst", source_rate=1.0 / interval) as (
            deployment, system):
        instance = system.process
        rss_before = instance.rss_bytes()
        profile = (Profile(pid=instance.pid, path=profile_dir / "burst-start.txt")
                   if profile_dir else None)
        profiling = profile.start() if profile else False
        start = await measured_burst(
            deployment, system, [Change(f"burst-{n}", True, interval, 1) for n in range(count)])
        start_profile = profile.stop() if profiling else None
        await asyncio.sleep(sizes.settle_seconds)
        rss_running = instance.rss_bytes()

        profile = (Profile(pid=instance.pid, path=profile_dir / "burst-stop.txt")
                   if profile_dir else None)
        profiling = profile.start() if profile else False
        stop = await measured_burst(
            deployment, system, [Change(f"burst-{n}", False, interval, 2) for n in range(count)])
        stop_profile = profile.stop() if profiling else None
        result = {
            "configs": count, "start": start, "stop": stop,
            "rss_mib": {"before": round(rss_before / MIB, 1),
                        "running": round(rss_running / MIB, 1)},
        }
        if start_profile or stop_profile:
            result["profile"] = {"start": start_profile, "stop": stop_profile}
        return result


# ---- 3. churn ----------------------------------------------------------------------------


async def churn(context: Context, sizes: Sizes) -> dict:
    base = sizes.churn_interval
    # About one order per interval and config: each pull publishes and saves a cursor.
    async with product_deployment(context, "churn", source_rate=1.0 / base) as (
            deployment, system):
        return await run_churn(deployment, system, configs=sizes.churn_configs,
                               rate=sizes.churn_rate, seconds=sizes.churn_seconds,
                               interval=base, seed=sizes.seed, restarts=True,
                               settle=sizes.settle_seconds)


async def run_churn(deployment: Deployment, system, *, configs: int, rate: float,
                    seconds: float, interval: float, seed: int, restarts: bool,
                    settle: float, converge_timeout: float = 1200.0, idle_seconds: float = 0.0,
                    servers: dict | None = None) -> dict:
    """Half the configs enabled, then `rate` changes per second for `seconds`; lags,
    convergence to the last change of every config, and overlaps at the source.

    With `idle_seconds`, the CPU of the system's process and of PostgreSQL is also read
    over that long with the configs running and no change arriving, before the churn."""
    assert deployment.observer is not None
    rng = random.Random(seed)
    states = {f"churn-{n}": Change(f"churn-{n}", rng.random() < 0.5, interval, 1)
              for n in range(configs)}
    active = ActiveRuns()
    deployment.observer.watch(active.seen)
    began = time.time()
    await system.apply(list(states.values()))
    enabled = [c.config_id for c in states.values() if c.enabled]
    await deployment.observer.all_of(enabled, "started", since=began,
                                     timeout=_timeout_for(configs))
    await asyncio.sleep(settle)
    idle = await idle_cpu(system, servers or {}, idle_seconds) if idle_seconds else None

    tracker = LagTracker()
    deployment.observer.watch(tracker.seen)
    process = system.process
    cpu_before = process.cpu_seconds()
    database = processes.CpuMeter((servers or {}).get("postgres", []), children=True).start()
    stream = ChangeStream(states, seed=seed + 1, restarts=restarts, base_interval=interval)
    driven = await drive(stream=stream, apply=system.apply, rate=rate, seconds=seconds,
                         on_change=tracker.changed)
    churn_cpu = process.cpu_seconds() - cpu_before
    churn_database_cpu = database.read()
    ended = driven.pop("last_change_at")
    intervals = stream.intervals if restarts else None
    checked_at = [-1]

    def settled() -> bool:
        # Only new events can change the answer; checking 5,000 configs every 10 ms for
        # nothing would take the benchmark's own process a good part of a core.
        count = len(deployment.observer.seen)
        if count == checked_at[0]:
            return False
        checked_at[0] = count
        return active.matches(states, intervals)

    converged = await wait_until(settled, timeout=converge_timeout, poll=0.01)
    convergence = time.time() - ended if converged else None
    await asyncio.sleep(1.0)  # requests of the last runs end
    overlaps = await deployment.overlaps()
    source = await deployment.source_stats()
    deployment.observer.unwatch(tracker.seen)
    deployment.observer.unwatch(active.seen)
    return {
        "configs": configs,
        "interval_s": interval,
        "target_per_second": rate,
        **driven,
        "start_lag": latency_summary(tracker.start_lags),
        "stop_lag": latency_summary(tracker.stop_lags),
        "superseded": tracker.superseded,
        "unanswered_at_end": tracker.unanswered,
        "converged": converged,
        "convergence_s": None if convergence is None else round(convergence, 3),
        # What the check still waited for when it gave up: the first configs that differ.
        "unconverged": [] if converged else active.differences(states, intervals),
        "overlap_pairs": overlaps["pairs"],
        "overlapping_configs": overlaps["configs"],
        "overlap_examples": overlaps["examples"],
        "source_requests": source["requests"],
        "process_cpu_s": round(churn_cpu, 2),
        "postgres_cpu_s": round(churn_database_cpu, 2),
        "idle": idle,
    }


async def idle_cpu(system, servers: dict, seconds: float) -> dict:
    """CPU of the system's process and of PostgreSQL while nothing changes, in percent of
    one core."""
    database = processes.CpuMeter(servers.get("postgres", []), children=True).start()
    before = system.process.cpu_seconds()
    began = time.monotonic()
    await asyncio.sleep(seconds)
    took = time.monotonic() - began
    return {
        "seconds": round(took, 1),
        "process_cpu_percent": round(100 * (system.process.cpu_seconds() - before) / took, 3),
        "postgres_cpu_percent": round(100 * database.read() / took, 3),
    }


# ---- 4. capacity -------------------------------------------------------------------------


class RenewalWatch:
    """Lease renewals of one run, read from outside through its row: each renewal sets
    `lease_expires_at = now() + lease`, `now()` being the statement's start, so the moment
    the new value is first visible, minus that start, is how long the one renewal
    statement for all runs took to commit (to within the polling period)."""

    def __init__(self, database_url: str, config_id: str, *, poll: float = 0.01) -> None:
        self._url = database_url
        self._config_id = config_id
        self._poll = poll
        self.durations: list[float] = []
        self.periods: list[float] = []

    async def run(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            last = None
            while True:
                row = await conn.fetchrow(
                    "SELECT EXTRACT(EPOCH FROM lease_expires_at)::float8 AS expires,"
                    " EXTRACT(EPOCH FROM clock_timestamp())::float8 AS seen"
                    " FROM pull_tasks WHERE config_id = $1", self._config_id)
                expires = row["expires"] if row else None
                if expires is not None and last is not None and expires != last:
                    self.durations.append(row["seen"] - (expires - LEASE_SECONDS))
                    self.periods.append(expires - last)
                last = expires
                await asyncio.sleep(self._poll)
        finally:
            await conn.close()


async def capacity(context: Context, sizes: Sizes, *, profile_dir=None) -> dict:
    count = sizes.capacity_configs
    interval = sizes.capacity_interval
    async with product_deployment(context, "capacity", source_rate=1.0 / interval) as (
            deployment, system):
        instance = system.process
        await asyncio.sleep(3.0)
        rss_empty = instance.rss_bytes()
        cpu_meter = instance.cpu_seconds()
        await asyncio.sleep(sizes.idle_seconds)
        empty_cpu = (instance.cpu_seconds() - cpu_meter) / sizes.idle_seconds

        profile = (Profile(pid=instance.pid, path=profile_dir / "capacity-start.txt")
                   if profile_dir else None)
        profiling = profile.start() if profile else False
        first_start = time.time()
        # A start that stops making progress (every new run's start matched by another's
        # lost lease) ends the wait: what the instance holds then is what it can hold.
        start = await start_all(deployment, system,
                                [Change(f"cap-{n}", True, interval, 1) for n in range(count)],
                                stall=STALL_SECONDS, timeout=max(600.0, count * 0.03))
        start_profile = profile.stop() if profiling else None
        running_after_start = await running_count(deployment)

        # Every run pulls first within 5 s of its start; wait for those pulls to end.
        await wait_first_pulls(deployment, start["observed"], timeout=120.0)
        await asyncio.sleep(sizes.settle_seconds)
        rss_running = instance.rss_bytes()
        loops = await running_count(deployment)

        watch = RenewalWatch(deployment.database_url, "cap-0")
        watching = asyncio.create_task(watch.run())
        profile = (Profile(pid=instance.pid, path=profile_dir / "capacity-idle.txt")
                   if profile_dir else None)
        profiling = profile.start() if profile else False
        requests_before = (await deployment.source_stats())["requests"]
        cpu_meter = instance.cpu_seconds()
        window_began = time.time()
        await asyncio.sleep(sizes.idle_seconds)
        idle_cpu = (instance.cpu_seconds() - cpu_meter) / (time.time() - window_began)
        requests_in_window = (await deployment.source_stats())["requests"] - requests_before
        idle_profile = profile.stop() if profiling else None
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        metrics = await system.metrics()

        shutdown_began = time.time()
        graceful = await system.stop(timeout=120.0)
        result = {
            "configs": count,
            "interval_s": interval,
            "start": start,
            "running_after_start": running_after_start,
            "running_at_measurement": loops,
            "rss_mib": {"empty": round(rss_empty / MIB, 1),
                        "running": round(rss_running / MIB, 1)},
            "rss_per_loop_kib": round((rss_running - rss_empty) / max(1, loops) / 1024, 2),
            "cpu_percent_of_a_core": {"empty": round(100 * empty_cpu, 2),
                                      "with_loops": round(100 * idle_cpu, 2)},
            "window_s": sizes.idle_seconds,
            "window_starts_after_first_start_s": round(window_began - first_start, 1),
            "source_requests_in_window": requests_in_window,
            "lease_renewal": {
                "observed": len(watch.durations),
                "statement_ms": latency_summary(watch.durations),
                "period_s": [round(p, 3) for p in watch.periods],
            },
            "lease_losses": metrics.get("reconciler_lease_losses_total"),
            "shutdown_s": None if graceful is None else round(graceful, 2),
            "shutdown_killed": graceful is None,
            "shutdown_wall_s": round(time.time() - shutdown_began, 2),
        }
        if start_profile or idle_profile:
            result["profile"] = {"start": start_profile, "idle": idle_profile}
        return result


async def running_count(deployment: Deployment) -> int:
    """Runs the table records as running, the loops the instance holds."""
    conn = await asyncpg.connect(deployment.database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM pull_tasks WHERE state = 'running'")
    finally:
        await conn.close()


async def wait_first_pulls(deployment: Deployment, runs: int, *, timeout: float) -> int:
    """Wait until the source has seen a request from as many runs (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await deployment.source_stats()
        if stats["runs"] >= runs or time.monotonic() > deadline:
            return stats["runs"]
        await asyncio.sleep(1.0)


# ---- 5. pull rate ------------------------------------------------------------------------


async def pull_rate(context: Context, sizes: Sizes) -> dict:
    """Configs with the shortest interval the contract allows against a local source that
    answers at once, more of them at each step, each step in a fresh deployment (so no
    step starts with a backlog of orders). The source makes one order per second and
    product: most pulls are one empty page and a write of the last pull; about one in
    twenty also publishes an order and saves its cursor."""
    steps = []
    for target in sizes.pull_steps:
        steps.append(await pull_rate_step(context, sizes, target))
    best = max(steps, key=lambda step: step["pulls_per_second"])
    return {"interval_s": sizes.pull_interval, "orders_per_second_per_config": 1.0,
            "steps": steps, "max_pulls_per_second": best["pulls_per_second"],
            "at_configs": best["configs"],
            "instance_cpu_ms_per_pull_at_max": best["instance_cpu_ms_per_pull"]}


async def pull_rate_step(context: Context, sizes: Sizes, configs: int) -> dict:
    interval = sizes.pull_interval
    async with product_deployment(context, f"pullrate{configs}", source_rate=1.0) as (
            deployment, system):
        servers = context.stack.server_processes()
        await start_all(deployment, system,
                        [Change(f"fast-{n}", True, interval, 1) for n in range(configs)])
        await asyncio.sleep(3.0)
        before = await system.metrics()
        meters = {
            "instance": processes.CpuMeter([system.process.process]),
            "source": processes.CpuMeter([deployment.source.process]),
            "kafka": processes.CpuMeter(servers.get("kafka", [])),
            "postgres": processes.CpuMeter(servers.get("postgres", []), children=True),
        }
        for meter in meters.values():
            meter.start()
        began = time.monotonic()
        await asyncio.sleep(sizes.pull_seconds)
        took = time.monotonic() - began
        cpu = {name: meter.read() for name, meter in meters.items()}
        after = await system.metrics()

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        pulls = delta("reconciler_pulls_total")
        return {
            "configs": configs,
            "offered_per_second": round(configs / interval, 1),
            "pulls_per_second": round(pulls / took, 1),
            "orders_per_second": round(delta("reconciler_orders_total") / took, 1),
            "pull_errors": delta("reconciler_pull_errors_total"),
            "instance_cpu_ms_per_pull": round(1000 * cpu["instance"] / pulls, 3)
            if pulls else None,
            "cpu_percent_of_a_core": {name: round(100 * value / took, 1)
                                      for name, value in cpu.items()},
        }
