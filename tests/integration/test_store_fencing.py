"""The table's fencing: a run whose lease was taken over writes nothing, so a saved cursor
is only ever replaced by one the current run got from the source."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from streams.configs import Tombstone, config_from_json_dict
from reconciler.store import Fenced, Store
from tests.integration.harness import Deployment, config_doc

pytestmark = pytest.mark.integration


URL = "http://127.0.0.1:9/orders"


def no_event(*args, **kwargs) -> dict:
    return {"note": "not checked here"}


async def test_a_stale_run_cannot_replace_the_cursor_or_the_last_pull_of_its_successor(
    deployment: Deployment,
) -> None:
    url = deployment.settings.database_url
    old = await Store.connect(url, instance_id="a", boot_id=uuid.uuid4().hex, pool_size=2,
                              timeout=10)
    new = await Store.connect(url, instance_id="b", boot_id=uuid.uuid4().hex, pool_size=2,
                              timeout=10)
    try:
        await old.migrate()
        config = config_from_json_dict(config_doc("c1", url="http://127.0.0.1:9/orders"),
                                       expected_id="c1")
        await old.write_desired(config, partition=0, offset=0, record_time=None)

        first = await old.take_lease("c1", run_id="run-1", lease_seconds=0.5,
                                     started_event=no_event)
        assert first is not None
        await old.save_cursor("c1", run_id="run-1", fence=first.fence, source=config,
                              cursor="c-10")

        await asyncio.sleep(0.7)  # the old holder froze past its lease
        assert await new.end_expired_run("c1", end_event=lambda *a: {"note": "expired"})
        second = await new.take_lease("c1", run_id="run-2", lease_seconds=10,
                                      started_event=no_event)
        assert second is not None and second.fence == first.fence + 1
        assert second.cursor == "c-10"
        await new.save_cursor("c1", run_id="run-2", fence=second.fence, source=config,
                              cursor="c-20")

        # The old run thaws and tries to write what it pulled before it froze.
        with pytest.raises(Fenced):
            await old.save_cursor("c1", run_id="run-1", fence=first.fence, source=config,
                                  cursor="c-11")
        with pytest.raises(Fenced):
            await old.record_successful_pull("c1", run_id="run-1", fence=first.fence,
                                             source=config, seconds_ago=0.0)
        # Even with the right run id, a stale fencing number matches nothing.
        with pytest.raises(Fenced):
            await old.save_cursor("c1", run_id="run-2", fence=first.fence, source=config,
                                  cursor="c-12")
        row = await new.read("c1")
        assert row.cursor == "c-20" and row.run_id == "run-2" and row.fence == second.fence
        assert row.last_pull_at is None
    finally:
        await old.close()
        await new.close()


async def test_a_lease_is_renewed_while_the_row_is_the_runs_whatever_the_desired_state(
    deployment: Deployment,
) -> None:
    """Disabling, deleting or changing a config leaves its run's lease to the reconcile
    that stops it with that reason; only a row that is no longer the run's, or a partition
    another instance claimed, ends the renewals."""
    url = deployment.settings.database_url
    store = await Store.connect(url, instance_id="a", boot_id=uuid.uuid4().hex, pool_size=2,
                                timeout=10)
    try:
        await store.migrate()
        leases = {}
        for config_id in ("disabled", "deleted", "changed", "taken-over", "claimed"):
            config = config_from_json_dict(
                config_doc(config_id, url=URL, version=1), expected_id=config_id)
            await store.write_desired(config, partition=0 if config_id != "claimed" else 1,
                                      offset=0, record_time=None)
            leases[config_id] = await store.take_lease(config_id, run_id=f"run-{config_id}",
                                                       lease_seconds=10,
                                                       started_event=no_event)
        changes = [
            config_doc("disabled", url=URL, version=2, enabled=False),
            None,
            config_doc("changed", url=URL, version=2, interval=99.0),
        ]
        for offset, (config_id, doc) in enumerate(zip(("disabled", "deleted", "changed"),
                                                      changes), start=1):
            change = (Tombstone(config_id) if doc is None
                      else config_from_json_dict(doc, expected_id=config_id))
            await store.write_desired(change, partition=0, offset=offset, record_time=None)
        other = await Store.connect(url, instance_id="b", boot_id=uuid.uuid4().hex,
                                    pool_size=2, timeout=10)
        try:
            await other.claim_partitions([1], generation=2)
        finally:
            await other.close()

        runs = [(c, f"run-{c}", lease.fence) for c, lease in leases.items()]
        runs[3] = ("taken-over", "run-taken-over", leases["taken-over"].fence - 1)
        renewed = await store.renew_leases(runs, lease_seconds=10)
        assert renewed == {"disabled", "deleted", "changed"}
    finally:
        await store.close()
