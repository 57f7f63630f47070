"""Keeping background work running, and cancellable.

A cleanup step that fails while a cancellation is on its way (a connection handed back to a
pool the database dropped, a listener removed from a closed connection) raises its own error
in place of the `CancelledError`. A loop that logs errors and tries again would then never
stop: the task was asked to stop once, and that request is gone. `cancelling()` still
remembers it.

The opposite failure is as quiet: a background task that ends by an error nobody expected
(or by a `CancelledError` raised from inside a library, not by a cancel) is simply gone, and
an instance without its relay or its lease renewal looks healthy while it is not. Such work
runs under `keep_running`, which says so in the log and starts it again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_PAUSE_SECONDS = 1.0


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that an error replaced."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def keep_running(work: Callable[[], Awaitable[None]], *, name: str,
                 pause: float = RESTART_PAUSE_SECONDS) -> asyncio.Task:
    """A task running `work`, started again after `pause` whenever it ends without being
    cancelled."""

    async def supervised() -> None:
        while True:
            try:
                await work()
                why = "returned"
            except asyncio.CancelledError:
                raise_if_cancelling()
                why = "was cancelled from inside"
            except Exception as error:
                raise_if_cancelling()
                why = f"failed: {' '.join(str(error).split()) or type(error).__name__}"
                log.debug("%s failed", name, exc_info=True)
            log.error("background task %s %s; starting it again in %.0f s", name, why, pause)
            await asyncio.sleep(pause)

    return asyncio.create_task(supervised(), name=name)
