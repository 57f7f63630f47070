"""The store's pools: a connection goes back to its pool without a reset round trip, and
one that listened for lease releases stops listening before anyone else gets it."""

from __future__ import annotations

import time
import uuid

import asyncpg
import pytest

from reconciler.store import IDLE_IN_TRANSACTION_SECONDS, LEASE_CHANNEL, Store

pytestmark = pytest.mark.integration


# The listener is left in place on purpose: the release must undo it.
@pytest.mark.filterwarnings("ignore:.*active notification listener")
async def test_a_release_sends_nothing_and_a_listening_connection_stops_listening(
    database_url: str,
) -> None:
    store = await Store.connect(database_url, instance_id="a", boot_id=uuid.uuid4().hex,
                                pool_size=1, timeout=10)
    try:
        sent: list[str] = []
        async with store.pool.acquire() as conn:
            conn.add_query_logger(lambda query: sent.append(query.query))
            await conn.fetchval("SELECT 1")
        # Back in the pool: nothing was sent for the release.
        assert sent == ["SELECT 1"]

        async with store.pool.acquire() as conn:
            await conn.add_listener(LEASE_CHANNEL, lambda *_: None)
            listening = await conn.fetchval("SELECT count(*) FROM pg_listening_channels()")
            assert listening == 1

        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    finally:
        await store.close()


async def test_a_session_frozen_inside_a_transaction_gives_up_its_row_locks(
    database_url: str,
) -> None:
    """An instance that stops (SIGSTOP, a long pause) between two statements of a
    transaction must not hold the rows its successors need: PostgreSQL ends its session."""
    store = await Store.connect(database_url, instance_id="a", boot_id=uuid.uuid4().hex,
                                pool_size=1, timeout=10)
    other = await asyncpg.connect(database_url)
    try:
        await store.migrate()
        await other.execute("INSERT INTO pull_tasks (config_id, enabled) VALUES ('c1', true)")
        async with store.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("SELECT 1 FROM pull_tasks WHERE config_id = 'c1' FOR UPDATE")
            began = time.monotonic()
            # The holder sends nothing more, as a frozen process would.
            await other.execute("UPDATE pull_tasks SET enabled = false WHERE config_id = 'c1'",
                                timeout=IDLE_IN_TRANSACTION_SECONDS + 5)
            waited = time.monotonic() - began
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                await conn.execute("SELECT 1")
        assert IDLE_IN_TRANSACTION_SECONDS - 0.5 <= waited <= IDLE_IN_TRANSACTION_SECONDS + 3
    finally:
        await other.close()
        await store.close()
