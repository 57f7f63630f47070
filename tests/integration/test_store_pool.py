"""The store's pools: a connection goes back to its pool without a reset round trip, one
that listened for lease releases stops listening before anyone else gets it, and a session
frozen inside a transaction does not keep its row locks."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import asyncpg
import pytest

from reconciler import store as store_module
from reconciler.store import LEASE_CHANNEL, Store
from reconciler.versions import Verdict
from tests.integration.harness import config_doc
from streams.configs import config_from_json_dict

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



async def test_a_desired_state_write_frozen_inside_its_transaction_gives_up_its_row_locks(
    database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance that stops (SIGSTOP, a long pause) between two statements of its batched
    desired-state write must not hold the rows its successors need: PostgreSQL ends the
    session after `IDLE_IN_TRANSACTION_SECONDS`, long before the process resumes."""
    idle, freeze = 2.0, 7.0
    monkeypatch.setattr(store_module, "IDLE_IN_TRANSACTION_SECONDS", idle)
    store = await Store.connect(database_url, instance_id="a", boot_id=uuid.uuid4().hex,
                                pool_size=2, timeout=10)
    try:
        await store.migrate()

        def record(version: int):
            return config_from_json_dict(config_doc("c1", url="http://127.0.0.1:9/a", version=version), expected_id="c1")

        await store.write_desired(record(1), partition=0, offset=0, record_time=None)

        frozen = threading.Event()
        waited: list[float] = []
        judge = store_module._judge_desired

        def judge_then_freeze(*args):
            frozen.set()
            time.sleep(freeze)  # the whole process stops, its event loop included
            return judge(*args)

        async def successor_update() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                began = time.monotonic()
                await conn.execute("UPDATE pull_tasks SET claimed_by = 'b' WHERE config_id = 'c1'",
                                   timeout=freeze + 5)
                waited.append(time.monotonic() - began)
            finally:
                await conn.close()

        successor = threading.Thread(
            target=lambda: frozen.wait(30) and asyncio.run(successor_update()))
        successor.start()
        monkeypatch.setattr(store_module, "_judge_desired", judge_then_freeze)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await store.write_desired(record(2), partition=0, offset=1, record_time=None)
        successor.join(30)
        assert len(waited) == 1
        # It waited for the lock (the row was held) but not for the thaw.
        assert idle - 0.5 <= waited[0] <= freeze - 2

        # The write is retried as the configs stream retries it, on a fresh session.
        monkeypatch.setattr(store_module, "_judge_desired", judge)
        written = await store.write_desired(record(2), partition=0, offset=1, record_time=None)
        assert written.judgement.verdict is Verdict.APPLY
        row = await store.read("c1")
        assert row.config_version == 2
    finally:
        await store.close()
