"""The comparator phase: the product and the timer-and-scan design, one after the other,
on the same machine, stack and sample source, with the same workload.

For each system (`product`, `scanner-fixed`, `scanner-unfixed`), in a deployment of its own:

1. reaction: configs enabled one every `SPACING_SECONDS`, each disabled a random part of a
   scan period after its start was seen; enable → `started` and disable → `stopped` as
   observed through Kafka;
2. `compare_configs` configs, half enabled; once all run, CPU over an idle window;
3. churn: `compare_rate` enable/disable flips per second for `compare_seconds`; the CPU of
   the system's process and of PostgreSQL meanwhile, convergence, and overlaps counted by
   the sample source (two runs of one config whose requests interleave).

Reactions of a design that acts on a timer are measured a few at a time, staggered, rather
than strictly one after another: with a 5 s scan, 200 sequential samples would take a
quarter of an hour, and a scan picks up every waiting change at once, so the staggering
does not change what is measured.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from bench.deployment import Change, Context, Deployment, ProductSystem, ScannerSystem
from bench.phases import Sizes, run_churn
from bench.stats import latency_summary, ratio

log = logging.getLogger(__name__)

SPACING_SECONDS = 0.1
SYSTEMS = ("product", "scanner-fixed", "scanner-unfixed")


async def staggered_reactions(deployment: Deployment, system, *, samples: int,
                              interval: float, timeout: float, gap: float,
                              seed: int) -> dict:
    """Each sample: enable, wait for `started`, wait a random part of `gap` (so that a
    disable does not always land just after a scan), disable, wait for `stopped`."""
    assert deployment.observer is not None
    observer = deployment.observer
    rng = random.Random(seed)
    gaps = [rng.uniform(0.0, gap) for _ in range(samples)]
    starts: list[float] = []
    stops: list[float] = []
    missed = 0

    async def one(number: int) -> None:
        nonlocal missed
        await asyncio.sleep(number * SPACING_SECONDS)
        config_id = f"react-{number}"
        try:
            began = time.time()
            await system.apply([Change(config_id, True, interval, 1)])
            seen = await observer.next_event(config_id, "started", since=began,
                                             timeout=timeout)
            starts.append(seen.arrived - began)
            await asyncio.sleep(gaps[number])
            began = time.time()
            await system.apply([Change(config_id, False, interval, 2)])
            seen = await observer.next_event(config_id, "stopped", since=began,
                                             timeout=timeout)
            stops.append(seen.arrived - began)
        except TimeoutError:
            missed += 1

    await asyncio.gather(*(one(n) for n in range(samples)))
    return {"start": latency_summary(starts), "stop": latency_summary(stops), "missed": missed}


async def run_system(context: Context, sizes: Sizes, name: str) -> dict:
    interval = sizes.compare_interval
    deployment = Deployment(context, f"compare-{name}", source_rate=1.0 / interval)
    if name == "product":
        system = ProductSystem(deployment)
        timeout = 60.0
    else:
        system = ScannerSystem(deployment, variant=name.split("-", 1)[1],
                               scan_seconds=sizes.scan_seconds)
        timeout = 3 * sizes.scan_seconds + 60.0
    try:
        await deployment.open(events_topic=system.events_topic)
        await system.start()
        reaction = await staggered_reactions(deployment, system,
                                             samples=sizes.compare_samples,
                                             interval=interval, timeout=timeout,
                                             gap=sizes.scan_seconds, seed=sizes.seed)
        churned = await run_churn(
            deployment, system, configs=sizes.compare_configs, rate=sizes.compare_rate,
            seconds=sizes.compare_seconds, interval=interval, seed=sizes.seed,
            restarts=False, settle=sizes.settle_seconds,
            converge_timeout=3 * sizes.scan_seconds + 120.0,
            idle_seconds=sizes.compare_idle_seconds,
            servers=context.stack.server_processes(),
        )
        rss = system.process.rss_bytes() if system.process else None
    finally:
        try:
            await system.stop()
        finally:
            await deployment.close()
    result = {"reaction": reaction, "churn": churned,
              "rss_mib_at_end": None if rss is None else round(rss / 1024 / 1024, 1)}
    if isinstance(system, ScannerSystem):
        result["scanner"] = system.stats()
    return result


async def compare(context: Context, sizes: Sizes) -> dict:
    results = {}
    for name in SYSTEMS:
        log.info("comparator: %s", name)
        results[name] = await run_system(context, sizes, name)
    product = results["product"]
    ratios = {}
    for name in SYSTEMS[1:]:
        scanner = results[name]
        ratios[name] = {
            "start_p50_scanner_over_product": ratio(
                scanner["reaction"]["start"]["p50_ms"], product["reaction"]["start"]["p50_ms"]),
            "stop_p50_scanner_over_product": ratio(
                scanner["reaction"]["stop"]["p50_ms"], product["reaction"]["stop"]["p50_ms"]),
            "churn_cpu_product_over_scanner": ratio(
                product["churn"]["process_cpu_s"], scanner["churn"]["process_cpu_s"]),
            "idle_cpu_product_over_scanner": ratio(
                product["churn"]["idle"]["process_cpu_percent"],
                scanner["churn"]["idle"]["process_cpu_percent"]),
            "overlap_pairs": {"product": product["churn"]["overlap_pairs"],
                              "scanner": scanner["churn"]["overlap_pairs"]},
        }
    return {
        "configs": sizes.compare_configs, "interval_s": sizes.compare_interval,
        "scan_s": sizes.scan_seconds, "changes_per_second": sizes.compare_rate,
        "churn_seconds": sizes.compare_seconds, "systems": results, "ratios": ratios,
    }
