"""The supervisor: the only owner of pull loops in this process.

It keeps the registry of runs (config id → `Run`), starts a loop for a lease just taken,
cancels a loop and awaits its end for a stop, renews every local lease in batched
statements, and cancels a run whose lease deadline has passed. It never decides whether a
config should run; reconciles do, and only reconciles add to or remove from the registry.

When a loop's task ends, for whatever reason, the supervisor asks for a reconcile of its
config (`on_run_ended`); that reconcile reads the outcome with `outcome_of` and records the
end. A run whose task is still alive stays in the registry, so a new run cannot start
beside a loop that is slow to stop.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable

from reconciler.loop import LeaseLost, LoopServices, Run, pull_loop
from reconciler.source import PullFailed
from reconciler.store import Fenced, Lease, Store

log = logging.getLogger(__name__)

# Runs renewed by one statement: a few milliseconds of the database each.
RENEWAL_CHUNK = 2000


class Ending(enum.Enum):
    STOPPED = "stopped"
    FAILED = "failed"
    # The run's row was taken over: someone else ended it in the record.
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    reason: str | None = None
    error: str | None = None
    retry_after: float | None = None


class Supervisor:
    """The registry of runs, with two schedules for the watchdog.

    Runs renewed by one statement share one deadline, so lease deadlines are kept in a heap
    of (deadline, runs) entries: a start pushes one, a renewal one for all the runs it moved.
    An entry is looked at when it comes due; a run whose deadline moved on since has a later
    entry and is skipped. Runs with a pull under way are kept in a second heap, by the time
    their pull would count as hung; a run whose pull ended or progressed meanwhile is dropped
    or filed again. So a watchdog pass costs what is due, not the size of the registry.
    """

    def __init__(
        self,
        *,
        services: LoopServices,
        store: Store,
        on_run_ended: Callable[[str], None],
        lease_seconds: float,
        lease_margin_seconds: float,
        stop_timeout: float,
        hang_grace: float = 15.0,
    ) -> None:
        self._services = services
        self._store = store
        self._on_run_ended = on_run_ended
        self._lease_seconds = lease_seconds
        self._lease_margin = lease_margin_seconds
        self._stop_timeout = stop_timeout
        self._hang_grace = hang_grace
        self.runs: dict[str, Run] = {}
        # (deadline, tie-breaker, runs whose lease deadline was set to it)
        self._deadlines: list[tuple[float, int, list[Run]]] = []
        # (time the pull would be hung, tie-breaker, run) for runs with a pull under way
        self._busy: list[tuple[float, int, Run]] = []
        self._busy_runs: set[Run] = set()
        self._order = itertools.count()

    def start(self, lease: Lease, *, lease_taken_at: float) -> Run:
        config_id = lease.config.id
        assert config_id not in self.runs, f"a run of {config_id} is already registered"
        run = Run(
            config=lease.config,
            run_id=lease.run_id,
            fence=lease.fence,
            cursor=lease.cursor,
            first_pull_delay=lease.first_pull_delay,
            lease_deadline=lease_taken_at + self._lease_seconds - self._lease_margin,
            on_progress=self._watch_pull,
        )
        run.task = asyncio.create_task(pull_loop(run, self._services), name=f"run:{config_id}")
        run.task.add_done_callback(lambda _: self._on_run_ended(config_id))
        self.runs[config_id] = run
        self._file_deadline(run.lease_deadline, [run])
        return run

    async def stop(self, config_id: str, *, reason: str) -> bool:
        """Cancel the config's loop and wait for it to end; False if it outlived the bound."""
        run = self.runs[config_id]
        assert run.task is not None
        if run.stop_reason is None:
            run.stop_reason = reason
        run.task.cancel()
        done, _ = await asyncio.wait({run.task}, timeout=self._stop_timeout)
        if not done:
            log.error(
                "loop did not stop within %.1f s; the config stays stopping until it ends",
                self._stop_timeout,
                extra={"config_id": config_id, "run_id": run.run_id},
            )
        return bool(done)

    def is_ending(self, config_id: str) -> bool:
        run = self.runs.get(config_id)
        return run is not None and (run.stop_reason is not None or run.task.done())

    @property
    def running(self) -> int:
        return sum(1 for run in self.runs.values() if not run.task.done())

    def remove(self, config_id: str) -> Run:
        run = self.runs.pop(config_id)
        assert run.task is not None and run.task.done()
        return run

    @staticmethod
    def outcome_of(run: Run) -> Outcome:
        task = run.task
        assert task is not None and task.done()
        if run.hang is not None:
            return Outcome(Ending.FAILED, error=run.hang)
        if task.cancelled():
            return Outcome(Ending.STOPPED, reason=run.stop_reason or "shutdown")
        error = task.exception()
        if isinstance(error, LeaseLost):
            # A revoked run says why it was revoked; otherwise its lease ran out.
            return Outcome(Ending.STOPPED, reason=run.stop_reason or "lease-lost")
        if isinstance(error, Fenced):
            return Outcome(Ending.FENCED)
        if isinstance(error, PullFailed):
            return Outcome(Ending.FAILED, error=str(error), retry_after=error.retry_after)
        if error is None:
            return Outcome(Ending.FAILED, error="loop ended without being stopped")
        text = " ".join(str(error).split())
        return Outcome(Ending.FAILED, error=f"loop crashed: {type(error).__name__}: {text}")

    async def renew_leases(self) -> None:
        """Renew every live local lease, a chunk of runs per statement.

        A statement for every run at once grows with the registry (half a second at 50,000
        runs) and gives all of them the deadline of its start; chunks keep each statement
        short and each run's deadline counts from the send of its own chunk. A run whose row
        was not renewed keeps its current deadline and stops at it (`lease-lost`) unless a
        reconcile stops it first with a better reason.
        """
        live = [run for run in self.runs.values() if not run.task.done() and not run.revoked]
        for first in range(0, len(live), RENEWAL_CHUNK):
            await self._renew_chunk(live[first:first + RENEWAL_CHUNK])
        self.enforce_deadlines()

    async def _renew_chunk(self, runs: list[Run]) -> None:
        # A run may have ended or been revoked while earlier chunks were renewed.
        runs = [run for run in runs if not run.task.done() and not run.revoked]
        if not runs:
            return
        sent = time.monotonic()
        renewed = await self._store.renew_leases(
            [(run.config.id, run.run_id, run.fence) for run in runs],
            lease_seconds=self._lease_seconds,
        )
        deadline = sent + self._lease_seconds - self._lease_margin
        self._services.metrics.lease_renewals.add(len(renewed))
        moved = []
        for run in runs:
            if run.config.id in renewed and run.lease_deadline < deadline:
                run.lease_deadline = deadline
                moved.append(run)
        self._file_deadline(deadline, moved)

    def enforce_deadlines(self) -> None:
        """Cancel the runs whose lease deadline passed (they may be stuck inside a request),
        and, as failed, the runs whose pull made no progress for its request timeout plus
        the grace: a source that never answers, or a code path that awaits forever."""
        now = time.monotonic()
        hung_now = self._end_hung_pulls(now)
        self._end_expired_leases(now, skip=hung_now)

    def _end_hung_pulls(self, now: float) -> set[Run]:
        hung_now: set[Run] = set()
        while self._busy and self._busy[0][0] < now:
            _, _, run = heapq.heappop(self._busy)
            since = run.busy_since_progress
            if since is None or run.task.done():
                self._busy_runs.discard(run)
                continue
            limit = run.config.source.timeout_seconds + self._hang_grace
            if now - since <= limit:
                # The pull progressed since this entry was filed.
                heapq.heappush(self._busy, (since + limit, next(self._order), run))
                continue
            self._busy_runs.discard(run)
            if run.hang is not None or run.stop_reason is not None:
                continue
            run.hang = (f"pull made no progress for {now - since:.0f} s "
                        f"(request timeout {run.config.source.timeout_seconds:g} s); "
                        f"ended by the watchdog")
            log.warning("pull hung; ending the run as failed",
                        extra={"config_id": run.config.id, "run_id": run.run_id})
            run.revoke()
            run.task.cancel()
            hung_now.add(run)
        return hung_now

    def _end_expired_leases(self, now: float, *, skip: set[Run]) -> None:
        later: list[Run] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, runs = heapq.heappop(self._deadlines)
            for run in runs:
                if run.lease_deadline != deadline or run.task.done():
                    continue  # renewed meanwhile (a later entry has it), or over
                if run.stop_reason is not None:
                    continue
                if run in skip:
                    # Ended as hung in this pass; its lease is looked at again in the next.
                    later.append(run)
                    continue
                log.warning(
                    "lease lost; stopping the run",
                    extra={"config_id": run.config.id, "run_id": run.run_id},
                )
                run.stop_reason = "lease-lost"
                run.task.cancel()
        for run in later:
            self._file_deadline(run.lease_deadline, [run])

    def _file_deadline(self, deadline: float, runs: list[Run]) -> None:
        if runs:
            heapq.heappush(self._deadlines, (deadline, next(self._order), runs))

    def _watch_pull(self, run: Run) -> None:
        if run in self._busy_runs:
            return  # already filed; a later look files it again by its newer progress
        self._busy_runs.add(run)
        limit = run.config.source.timeout_seconds + self._hang_grace
        heapq.heappush(self._busy, (run.busy_since_progress + limit, next(self._order), run))

    def abandon(self, config_id: str, *, reason: str) -> None:
        """Stop a run at once, dropping whatever it has not finished: for a run whose
        successor may start elsewhere any moment (this instance lost the broker)."""
        run = self.runs[config_id]
        if run.stop_reason is None:
            run.stop_reason = reason
        run.revoke()
        run.task.cancel()

    async def cancel_all(self, *, reason: str, timeout: float | None = None) -> None:
        """For shutdown: cancel every loop and wait, bounded (by the stop timeout, or
        `timeout` if given), for all of them to end."""
        tasks = []
        for run in self.runs.values():
            if run.stop_reason is None:
                run.stop_reason = reason
            run.task.cancel()
            tasks.append(run.task)
        if tasks:
            await asyncio.wait(tasks, timeout=self._stop_timeout if timeout is None else timeout)
