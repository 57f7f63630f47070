"""Ending a run records its end and its event and releases its lease, once."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from streams.configs import Tombstone, config_from_json_dict
from reconciler.store import LEASE_CHANNEL, Store
from tests.integration.harness import config_doc

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(database_url: str):
    """A store of instance `a` on a migrated database of the test's own."""
    store = await Store.connect(database_url, instance_id="a", boot_id=uuid.uuid4().hex,
                                pool_size=2, timeout=10)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


@pytest.fixture
async def listener(database_url: str):
    """A connection of its own, for listening to lease releases."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def test_ending_a_run_records_its_end_and_event_and_wakes_whoever_waits_for_the_lease(
    store: Store, listener: asyncpg.Connection,
) -> None:
    config = config_from_json_dict(config_doc("c1", url="http://127.0.0.1:9/orders"),
                                   expected_id="c1")
    await store.write_desired(config, partition=0, offset=0, record_time=None)
    lease = await store.take_lease("c1", run_id="run-1", lease_seconds=10,
                                   started_event=lambda fence: {"type": "started"})
    assert lease is not None
    released = asyncio.Queue()
    await listener.add_listener(LEASE_CHANNEL, lambda *args: released.put_nowait(args[3]))

    ended = await store.stop_runs([("c1", "run-1", lease.fence, {"type": "stopped"})])

    assert ended == {"c1"}
    assert await asyncio.wait_for(released.get(), 5) == "c1"
    row = await store.pool.fetchrow(
        "SELECT state, owner, owner_boot, lease_expires_at FROM pull_tasks"
        " WHERE config_id = 'c1'")
    assert dict(row) == {"state": "stopped", "owner": None, "owner_boot": None,
                         "lease_expires_at": None}
    events = await store.pool.fetch("SELECT event->>'type' AS type FROM lifecycle_outbox"
                                    " ORDER BY id")
    assert [e["type"] for e in events] == ["started", "stopped"]

    # A second end of the same run records nothing and sends no event.
    assert await store.stop_runs([("c1", "run-1", lease.fence, {"type": "stopped"})]) == set()
    assert await store.pool.fetchval("SELECT count(*) FROM lifecycle_outbox") == 2


async def test_a_started_event_names_the_version_the_lease_was_taken_on(
    store: Store,
) -> None:
    """A reconcile reads version 1, version 2 is stored, then the lease is taken: the run
    runs version 2 (the lease returns the current config), and its event must say so."""
    for version, interval in ((1, 20.017), (2, 20.018)):
        doc = {**config_doc("c2", url="http://127.0.0.1:9/orders"),
               "version": version, "interval_seconds": interval}
        config = config_from_json_dict(doc, expected_id="c2")
        await store.write_desired(config, partition=0, offset=version, record_time=None)
    read_before = 1
    lease = await store.take_lease(
        "c2", run_id="run-2", lease_seconds=10,
        started_event=lambda fence: {"type": "started",
                                     "data": {"fence": fence,
                                              "config_version": read_before}})
    assert lease is not None and lease.config.interval_seconds == 20.018
    event = await store.pool.fetchval(
        "SELECT event FROM lifecycle_outbox WHERE config_id = 'c2'")
    data = json.loads(event)["data"]
    assert data == {"fence": lease.fence, "config_version": 2}


async def test_stopped_runs_are_ended_together_each_once_with_the_state_its_row_says(
    store: Store, listener: asyncpg.Connection,
) -> None:
    fences = {}
    for config_id in ("c1", "c2", "c3"):
        config = config_from_json_dict(
            config_doc(config_id, url="http://127.0.0.1:9/orders"), expected_id=config_id)
        await store.write_desired(config, partition=0, offset=0, record_time=None)
        lease = await store.take_lease(config_id, run_id=f"run-{config_id}",
                                       lease_seconds=10,
                                       started_event=lambda fence: {"type": "started"})
        fences[config_id] = lease.fence
    await store.write_desired(Tombstone("c3"), partition=0, offset=1, record_time=None)
    released = asyncio.Queue()
    await listener.add_listener(LEASE_CHANNEL, lambda *args: released.put_nowait(args[3]))

    ended = await store.stop_runs(
        [(c, f"run-{c}", fences[c], {"type": "stopped", "subject": c}) for c in fences]
        + [("c1", "run-c1", fences["c1"] - 1, {"type": "stale"})])

    assert ended == {"c1", "c2", "c3"}
    assert sorted([await asyncio.wait_for(released.get(), 5) for _ in range(3)]) == [
        "c1", "c2", "c3"]
    rows = await store.pool.fetch(
        "SELECT config_id, state, owner, lease_expires_at FROM pull_tasks ORDER BY 1")
    assert [tuple(r) for r in rows] == [("c1", "stopped", None, None),
                                        ("c2", "stopped", None, None),
                                        ("c3", "deleted", None, None)]
    events = await store.pool.fetch(
        "SELECT event->>'type' AS type, event->>'subject' AS subject"
        " FROM lifecycle_outbox WHERE event->>'type' <> 'started' ORDER BY id")
    assert [tuple(e) for e in events] == [("stopped", "c1"), ("stopped", "c2"),
                                          ("stopped", "c3")]
