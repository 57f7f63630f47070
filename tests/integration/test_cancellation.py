"""A thousand loops cancelled at once while they wait on the database: the pools come out
whole, every run ends once, and the shutdown ends within its bound."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from tests.integration.harness import Deployment, end_counts, wait_for

pytestmark = pytest.mark.integration

LOOPS = 1000


async def test_a_thousand_loops_cancelled_inside_database_calls_leave_the_pools_whole(
    deployment: Deployment,
) -> None:
    instance = await deployment.start_instance(db_pool_size=10)
    store = instance.store
    save_cursor = store.save_cursor

    async def slow_save_cursor(*args, **kwargs):
        # Every loop spends its time inside the database: most of them wait for one of
        # the loops' pool's ten connections.
        await store.loop_pool.execute("SELECT pg_sleep(0.2)")
        await save_cursor(*args, **kwargs)

    store.save_cursor = slow_save_cursor
    pools_at_close: list[tuple[int, int]] = []
    close = store.close

    async def close_and_look() -> None:
        pools_at_close.extend((p.get_size(), p.get_idle_size())
                              for p in (store.pool, store.loop_pool))
        await close()

    store.close = close_and_look
    for n in range(LOOPS):
        await deployment.put(f"c{n:04d}", interval=0.5, channel=f"shop-{n % 20}")
    await wait_for(lambda: instance.supervisor.running >= LOOPS, timeout=240,
                   what=f"{LOOPS} loops running",
                   show=lambda: f"{instance.supervisor.running} running")
    await asyncio.sleep(2.0)  # let them pile up on the pool

    began = time.monotonic()
    await deployment.stop_instance(instance)  # cancels every loop at once
    stopped_in = time.monotonic() - began
    print(f"shutdown with {LOOPS} loops inside database calls took {stopped_in:.1f} s")

    assert instance.supervisor.running == 0
    # Every connection was back in its pool, none lost to a cancelled query.
    assert len(pools_at_close) == 2
    assert all(size <= 10 and idle == size for size, idle in pools_at_close), pools_at_close
    conn = await asyncpg.connect(deployment.settings.database_url)
    try:
        others = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert others == 0
    await wait_for(lambda: len(end_counts(deployment.events)) >= LOOPS and
                   all(c == 1 for c in end_counts(deployment.events).values()),
                   timeout=60, what="one end event per run")
    assert stopped_in < 30.0
