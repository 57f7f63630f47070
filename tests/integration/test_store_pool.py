"""The store's pools: a connection goes back to its pool without a reset round trip, and
one that listened for lease releases stops listening before anyone else gets it."""

from __future__ import annotations

import uuid

import pytest

from reconciler.store import LEASE_CHANNEL, Store

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

