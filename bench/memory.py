"""Where a loop's memory goes: `python -m bench.memory --loops 20000`.

No broker or database: the product's own `Supervisor.start` is called for `--loops` leases
(each with its own `Config`, parsed from JSON as a lease taken from the table is), so each
starts the real `pull_loop` task, which waits for its first pull. tracemalloc then says
which lines allocated what stays, and psutil what the process grew by, per loop. What the
capacity phase measures on top of this (the instance's RSS delta per loop minus this) is
the rest of the instance's per-config state and the allocator's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import tracemalloc

import psutil

from streams.configs import config_from_json_dict
from reconciler.store import Lease
from reconciler.supervisor import Supervisor


def lease_for(number: int) -> Lease:
    config = config_from_json_dict({
        "id": f"cap-{number}", "enabled": True, "channel_id": "bench",
        "product_id": f"cap-{number}", "interval_seconds": 300,
        "source": {"type": "http", "url": "http://127.0.0.1:1/orders"}, "version": 1,
    })
    return Lease(run_id=f"{number:032x}", fence=1, config=config, cursor=None,
                 first_pull_delay=3600.0, lease_seconds=10.0)


def start_loops(loops: int) -> Supervisor:
    supervisor = Supervisor(services=None, store=None, on_run_ended=lambda _: None,
                            lease_seconds=10.0, lease_margin_seconds=2.0, stop_timeout=5.0)
    now = time.monotonic()
    for number in range(loops):
        supervisor.start(lease_for(number), lease_taken_at=now)
    return supervisor


async def stop_loops(supervisor: Supervisor) -> None:
    for run in supervisor.runs.values():
        run.task.cancel()
    await asyncio.sleep(0.1)


async def measure(loops: int, top: int) -> dict:
    """Two passes: the process's growth without tracing, then tracemalloc's view (whose
    own bookkeeping would inflate the first)."""
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    supervisor = start_loops(loops)
    await asyncio.sleep(0.5)  # every loop is inside its first sleep
    gc.collect()
    rss_per_loop = (process.memory_info().rss - rss_before) / loops
    await stop_loops(supervisor)
    del supervisor
    gc.collect()

    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    supervisor = start_loops(loops)
    await asyncio.sleep(0.5)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    await stop_loops(supervisor)
    differences = after.compare_to(before, "lineno")
    total = sum(d.size_diff for d in differences)
    lines = [
        {"where": f"{d.traceback[0].filename.rsplit('site-packages/', 1)[-1]}:"
                  f"{d.traceback[0].lineno}",
         "bytes_per_loop": round(d.size_diff / loops, 1),
         "objects_per_loop": round(d.count_diff / loops, 2)}
        for d in differences[:top]
    ]
    return {
        "loops": loops,
        "rss_bytes_per_loop": round(rss_per_loop, 1),
        "traced_bytes_per_loop": round(total / loops, 1),
        "top_lines": lines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=15)
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(measure(arguments.loops, arguments.top)), indent=2))


if __name__ == "__main__":
    main()
