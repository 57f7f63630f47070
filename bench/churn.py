"""Random changes at a steady rate, and what they should lead to.

`ChangeStream` makes the changes: a config's enabled flag flips, or, for the product, its
interval moves to a value it never had (so the change is a real content change and its run
restarts). `LagTracker` pairs each change with the event that carries it out: a change
that asks for a start waits for a `started` event of its version or later, a disable for a
`stopped` event (reason `disabled`). A change overtaken by the next change of the same
config before its effect was seen is counted as superseded and gives no sample.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from bench.deployment import Change
from bench.observe import Seen


class ChangeStream:
    def __init__(self, states: dict[str, Change], *, seed: int, restarts: bool,
                 base_interval: float) -> None:
        self.states = states
        # (config id, version) → interval, for what a run started at a version pulls with.
        self.intervals = {(c.config_id, c.version): c.interval for c in states.values()}
        self._ids = sorted(states)
        self._rng = random.Random(seed)
        self._restarts = restarts
        self._base_interval = base_interval

    def next(self) -> tuple[Change, Change]:
        """(previous, new) desired state of one config."""
        config_id = self._rng.choice(self._ids)
        previous = self.states[config_id]
        version = previous.version + 1
        if self._restarts and self._rng.random() < 0.3:
            # A value of its own per version, so that the content differs from every
            # earlier one.
            new = Change(config_id, previous.enabled,
                         round(self._base_interval + version * 0.001, 3), version)
        else:
            new = Change(config_id, not previous.enabled, previous.interval, version)
        self.states[config_id] = new
        self.intervals[(config_id, version)] = new.interval
        return previous, new


class LagTracker:
    def __init__(self) -> None:
        self._starts: dict[str, tuple[float, int]] = {}
        self._stops: dict[str, float] = {}
        self.start_lags: list[float] = []
        self.stop_lags: list[float] = []
        self.superseded = 0

    def changed(self, previous: Change, new: Change, at: float) -> None:
        config_id = new.config_id
        wants_start = new.enabled and (not previous.enabled
                                       or new.interval != previous.interval)
        wants_stop = previous.enabled and not new.enabled
        if not (wants_start or wants_stop):
            return
        if self._starts.pop(config_id, None) is not None:
            self.superseded += 1
        if self._stops.pop(config_id, None) is not None:
            self.superseded += 1
        if wants_start:
            self._starts[config_id] = (at, new.version)
        else:
            self._stops[config_id] = at

    def seen(self, event: Seen) -> None:
        if event.kind == "started":
            pending = self._starts.get(event.subject)
            if pending is not None and (event.version is None or event.version >= pending[1]):
                if event.arrived >= pending[0]:
                    self.start_lags.append(event.arrived - pending[0])
                    del self._starts[event.subject]
        elif event.kind == "stopped" and event.reason in (None, "disabled"):
            since = self._stops.get(event.subject)
            if since is not None and event.arrived >= since:
                self.stop_lags.append(event.arrived - since)
                del self._stops[event.subject]

    @property
    def unanswered(self) -> int:
        return len(self._starts) + len(self._stops)


class ActiveRuns:
    """Config → the `started` event of its run without an end event, kept as events come."""

    def __init__(self) -> None:
        self.active: dict[str, Seen] = {}

    def seen(self, event: Seen) -> None:
        if event.kind == "started":
            self.active[event.subject] = event
        else:
            current = self.active.get(event.subject)
            if current is not None and current.run_id == event.run_id:
                del self.active[event.subject]

    def matches(self, final: dict[str, Change],
                intervals: dict[tuple[str, int], float] | None = None) -> bool:
        """Every config runs exactly when its last change says so, and, given `intervals`
        of every version, a run pulls with the last change's interval: the product keeps
        a run whose content did not change under a newer version (a disable and an enable
        taken together), so its `started` event may name an older version."""
        return not self.differences(final, intervals, first=1)

    def differences(self, final: dict[str, Change],
                    intervals: dict[tuple[str, int], float] | None = None, *,
                    first: int = 20) -> list[dict]:
        """The first configs whose run does not match their last change, for a report."""
        found = []
        for config_id, change in final.items():
            run = self.active.get(config_id)
            wrong_interval = (
                intervals is not None and run is not None and run.version is not None
                and intervals.get((config_id, run.version)) != change.interval)
            if change.enabled != (run is not None) or wrong_interval:
                found.append({
                    "config": config_id, "last_version": change.version,
                    "enabled": change.enabled, "interval": change.interval,
                    "run_version": None if run is None else run.version,
                    "run_interval": None if run is None or intervals is None
                    else intervals.get((config_id, run.version)),
                })
                if len(found) >= first:
                    break
        return found


async def drive(*, stream: ChangeStream, apply: Callable[[list[Change]], Awaitable[None]],
                rate: float, seconds: float,
                on_change: Callable[[Change, Change, float], None]) -> dict:
    """Hand `rate` changes per second to `apply` for `seconds`, in order, in small batches.

    Changes are made when they are due and handed over by one sender in order; if the
    system takes them slower than the rate, fewer are sent, and the achieved rate says so.
    """
    loop = asyncio.get_running_loop()
    tick = 0.02
    began = loop.time()
    made = 0
    sent = 0
    last_change_at = time.time()
    while True:
        elapsed = loop.time() - began
        if elapsed >= seconds:
            break
        due = int(elapsed * rate) - made
        if due > 0:
            pairs = [stream.next() for _ in range(due)]
            made += due
            at = time.time()
            for previous, new in pairs:
                on_change(previous, new, at)
            await apply([new for _, new in pairs])
            last_change_at = time.time()
            sent += due
        await asyncio.sleep(tick)
    took = loop.time() - began
    return {"changes": sent, "seconds": round(took, 2), "last_change_at": last_change_at,
            "achieved_per_second": round(sent / took, 1) if took else None}
