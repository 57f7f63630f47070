"""The supervisor's leases and watchdog: renewals, lease deadlines and hung pulls, with loops
that only sleep."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from streams.configs import config_from_json_dict
from reconciler.store import Lease
from reconciler import supervisor as supervisor_module
from reconciler.supervisor import Ending, Supervisor

LEASE = 10.0
MARGIN = 2.0


class Counter:
    def __init__(self) -> None:
        self.total = 0

    def add(self, amount: int, *_: object) -> None:
        self.total += amount


class RenewingStore:
    """Renews the leases of the configs it is told to, like the table would."""

    def __init__(self) -> None:
        self.renewable: set[str] = set()
        self.statements: list[list[tuple]] = []

    async def renew_leases(self, runs, *, lease_seconds: float) -> set[str]:
        self.statements.append(list(runs))
        return {config_id for config_id, *_ in runs if config_id in self.renewable}


def lease_for(config_id: str, *, timeout: float = 10.0) -> Lease:
    config = config_from_json_dict({
        "id": config_id, "enabled": True, "channel_id": "shop", "product_id": "sku",
        "interval_seconds": 300,
        "source": {"type": "http", "url": "http://127.0.0.1:1/orders",
                   "timeout_seconds": timeout},
    })
    # The first pull is an hour away: the loops only sleep.
    return Lease(run_id=f"run-{config_id}", fence=1, config=config, cursor=None,
                 first_pull_delay=3600.0, lease_seconds=LEASE)


def supervisor_with(store: RenewingStore, *, hang_grace: float = 15.0) -> Supervisor:
    services = SimpleNamespace(metrics=SimpleNamespace(lease_renewals=Counter()))
    return Supervisor(services=services, store=store, on_run_ended=lambda _: None,
                      lease_seconds=LEASE, lease_margin_seconds=MARGIN, stop_timeout=1.0,
                      hang_grace=hang_grace)


async def test_a_run_past_its_lease_deadline_stops_as_lease_lost_and_a_renewed_one_runs_on():
    store = RenewingStore()
    supervisor = supervisor_with(store)
    # Both leases were taken long enough ago that their deadlines are a moment away.
    taken = time.monotonic() - (LEASE - MARGIN) + 0.2
    kept = supervisor.start(lease_for("kept"), lease_taken_at=taken)
    lost = supervisor.start(lease_for("lost"), lease_taken_at=taken)
    store.renewable = {"kept"}

    await supervisor.renew_leases()
    supervisor.enforce_deadlines()
    assert kept.stop_reason is None and lost.stop_reason is None

    await asyncio.sleep(0.3)
    supervisor.enforce_deadlines()
    await asyncio.sleep(0)

    assert lost.stop_reason == "lease-lost" and lost.task.cancelled()
    assert supervisor.outcome_of(lost).reason == "lease-lost"
    assert kept.stop_reason is None and not kept.task.done()
    assert kept.lease_deadline > time.monotonic() + LEASE - MARGIN - 1.0
    await supervisor.cancel_all(reason="shutdown")


async def test_a_pull_without_progress_past_its_timeout_and_grace_ends_the_run_as_failed():
    supervisor = supervisor_with(RenewingStore(), hang_grace=0.1)
    taken = time.monotonic()
    hung = supervisor.start(lease_for("hung", timeout=0.1), lease_taken_at=taken)
    moving = supervisor.start(lease_for("moving", timeout=0.1), lease_taken_at=taken)
    idle = supervisor.start(lease_for("idle", timeout=0.1), lease_taken_at=taken)
    hung.progressed()
    moving.progressed()
    idle.progressed()
    idle.busy_since_progress = None  # its pull ended

    for _ in range(4):
        await asyncio.sleep(0.1)
        moving.progressed()
        supervisor.enforce_deadlines()
    await asyncio.sleep(0)

    assert hung.task.cancelled() and "ended by the watchdog" in hung.hang
    assert supervisor.outcome_of(hung).ending is Ending.FAILED
    assert moving.hang is None and not moving.task.done()
    assert idle.hang is None and not idle.task.done()

    # A pull that stops moving later is caught then.
    await asyncio.sleep(0.3)
    supervisor.enforce_deadlines()
    assert moving.hang is not None
    await supervisor.cancel_all(reason="shutdown")


async def test_a_hung_run_past_its_lease_too_ends_as_failed_not_as_lease_lost():
    supervisor = supervisor_with(RenewingStore(), hang_grace=0.0)
    run = supervisor.start(lease_for("both", timeout=0.1),
                           lease_taken_at=time.monotonic() - LEASE)
    run.progressed()
    await asyncio.sleep(0.15)

    supervisor.enforce_deadlines()
    await asyncio.sleep(0)

    assert run.task.cancelled()
    assert supervisor.outcome_of(run).ending is Ending.FAILED


async def test_renewal_sends_the_live_runs_in_chunks_and_moves_only_the_renewed_deadlines(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(supervisor_module, "RENEWAL_CHUNK", 2)
    store = RenewingStore()
    supervisor = supervisor_with(store)
    taken = time.monotonic() - 5.0
    runs = [supervisor.start(lease_for(f"c{n}"), lease_taken_at=taken) for n in range(6)]
    runs[5].revoke()  # a revoked run is not renewed
    store.renewable = {"c0", "c1", "c2", "c4"}

    before = time.monotonic()
    await supervisor.renew_leases()

    assert [[config_id for config_id, *_ in statement] for statement in store.statements] == [
        ["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert store.statements[0][0] == ("c0", "run-c0", 1)
    for run in runs:
        renewed = run.config.id in store.renewable
        assert (run.lease_deadline >= before + LEASE - MARGIN) is renewed, run.config.id
    await supervisor.cancel_all(reason="shutdown")
