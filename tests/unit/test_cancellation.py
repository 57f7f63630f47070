"""A retrying loop stops when cancelled even if a failing cleanup replaced the cancel."""

from __future__ import annotations

import asyncio

from reconciler.cancellation import keep_running, raise_if_cancelling


async def retrying_loop(attempts: list[int], *, failing_attempts: int = 0) -> None:
    while True:
        try:
            try:
                attempts.append(1)
                if len(attempts) <= failing_attempts:
                    raise ConnectionError("connection refused")
                await asyncio.sleep(10)
            finally:
                if len(attempts) > failing_attempts:
                    raise ConnectionError("pool is closed")  # cleanup failing during a cancel
        except asyncio.CancelledError:
            raise
        except Exception:
            raise_if_cancelling()
            await asyncio.sleep(0.01)


async def test_a_cancel_replaced_by_a_cleanup_error_still_stops_the_loop() -> None:
    attempts: list[int] = []
    task = asyncio.create_task(retrying_loop(attempts))
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert done and task.cancelled()
    assert attempts == [1]


async def test_errors_without_a_cancel_are_retried() -> None:
    attempts: list[int] = []
    task = asyncio.create_task(retrying_loop(attempts, failing_attempts=3))
    await asyncio.sleep(0.2)
    assert not task.done() and len(attempts) == 4
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.cancelled()


async def test_background_work_that_fails_or_returns_is_started_again(caplog) -> None:
    starts: list[str] = []

    async def work() -> None:
        starts.append("start")
        if len(starts) == 1:
            raise RuntimeError("the relay broke")
        if len(starts) == 2:
            raise asyncio.CancelledError  # from inside a library, not a cancel
        if len(starts) == 3:
            return
        await asyncio.sleep(10)

    task = keep_running(work, name="relay", pause=0.01)
    await asyncio.sleep(0.3)
    assert len(starts) == 4 and not task.done()
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert messages == [
        "background task relay failed: the relay broke; starting it again in 0 s",
        "background task relay was cancelled from inside; starting it again in 0 s",
        "background task relay returned; starting it again in 0 s",
    ]
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.cancelled() and len(starts) == 4
