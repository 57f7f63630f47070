"""Runs that stop making progress, or crash, are ended as failed and started again."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


async def test_a_pull_that_awaits_forever_is_ended_by_the_watchdog_and_retried(
    deployment: Deployment,
) -> None:
    instance = await deployment.start_instance(hang_grace_seconds=1.0)
    source = instance.source
    fetch_page = source.fetch_page
    hung = asyncio.Event()

    async def first_call_never_returns(*args, **kwargs):
        if not hung.is_set():
            hung.set()
            await asyncio.Event().wait()  # a code path that awaits forever
        return await fetch_page(*args, **kwargs)

    source.fetch_page = first_call_never_returns
    await deployment.put("c1", interval=0.2, timeout=0.5)
    failed = await wait_for(lambda: deployment.events_of("c1", "failed"), timeout=30,
                            what="the hung run's failed event")
    assert "ended by the watchdog" in failed[0]["data"]["error"]
    assert failed[0]["data"]["attempt"] == 1
    await wait_for(lambda: len(deployment.events_of("c1", "started")) == 2, timeout=30,
                   what="a new run after the backoff")
    await wait_for(lambda: deployment.orders_of("c1"), timeout=30, what="orders of the new run")
    row = await deployment.row("c1")
    assert row["state"] == "running"


async def test_a_loop_that_crashes_outside_its_pull_is_reported_failed_and_retried(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reconciler import loop

    jitter = loop.first_pull_jitter
    crashed = []

    def crash_once(interval: float) -> float:
        if not crashed:
            crashed.append(True)
            raise KeyError("parsing went wrong")
        return jitter(interval)

    monkeypatch.setattr(loop, "first_pull_jitter", crash_once)
    await deployment.start_instance()
    await deployment.put("c2", interval=0.2)
    failed = await wait_for(lambda: deployment.events_of("c2", "failed"), timeout=30,
                            what="the crashed run's failed event")
    assert "loop crashed: KeyError" in failed[0]["data"]["error"]
    await wait_for(lambda: len(deployment.events_of("c2", "started")) == 2, timeout=30,
                   what="a new run after the backoff")
    await wait_for(lambda: deployment.orders_of("c2"), timeout=30, what="orders of the new run")
