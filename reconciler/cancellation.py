"""Keeping a retrying loop cancellable.

A cleanup step that fails while a cancellation is on its way (a connection handed back to a
pool the database dropped, a listener removed from a closed connection) raises its own error
in place of the `CancelledError`. A loop that logs errors and tries again would then never
stop: the task was asked to stop once, and that request is gone. `cancelling()` still
remembers it.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that an error replaced."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
