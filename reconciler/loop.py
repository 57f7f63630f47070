"""The pull loop of one run: wait for the first pull, then pull every interval until cancelled.

A pull asks the source for pages from the saved cursor on; each non-empty page's orders go
to `<p>.orders`, and the page's cursor is saved only after Kafka acknowledged them. Publish
and save form one critical section that a cancellation does not cut in half, so a graceful
stop never leaves orders published with the old cursor saved; only the wait on the source
is abandoned at once. The section has a bound (`CRITICAL_SECTION_SECONDS`): past it the run
is revoked, and its orders not yet acknowledged are dropped, never written later.

Before every request and every publish the run checks its lease deadline (monotonic clock,
moved forward by each renewal); past it the run raises `LeaseLost` and does nothing more.
Orders go out in Kafka transactions under the transactional id of the config's configs
partition (see `streams.transactions`), and a run holds that id, fencing every earlier
holder, before its first request: so orders a predecessor wrote before its deadline but
that reach the broker late (a frozen process, a path that held them) are rejected or
aborted, never visible to a read-committed consumer after this run began. Every write to
the table carries the run's fencing number and raises `Fenced` when stale.

The loop ends only by cancellation (a stop) or by an exception: `PullFailed`, `LeaseLost`,
`Fenced`, or a crash. The supervisor turns that into the run's end event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import Link

from streams.configs import Config
from streams.publisher import Expired, OutgoingRecord
from streams.transactions import NotHeld, TransactionalSenders
from streams.tracing import producer_span
from reconciler.metrics import Metrics
from reconciler.source import OrderSource, Page, PagingGuard, PullFailed, RunIdentity
from reconciler.store import Fenced, Store

log = logging.getLogger(__name__)
tracer = trace.get_tracer("reconciler.loop")

# Bound of the publish-then-save section once a stop has been asked for; below the
# supervisor's default stop timeout, so a stopped run ends within it.
CRITICAL_SECTION_SECONDS = 2.0
# How long a revoked section may take to notice (its writes check the lease first).
REVOKED_SECTION_SECONDS = 1.0


class LeaseLost(Exception):
    """The run's lease deadline passed before it could be renewed."""


@dataclass(eq=False)
class Run:
    """One life of a loop for a config; the supervisor's registry holds these."""

    config: Config
    run_id: str
    fence: int
    cursor: str | None
    first_pull_delay: float
    # Monotonic time after which the run must not send or publish anything.
    lease_deadline: float
    task: asyncio.Task | None = None
    # Set by whoever cancels the run: the `reason` of its `stopped` event.
    stop_reason: str | None = None
    # The configs-topic partition the config belongs to: its run stops when it moves away.
    source_partition: int | None = None
    pulled: int = 0
    orders_published: int = 0
    # The span context of the run's start: every pull's trace links to it.
    start_context: trace.SpanContext | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    # Set when the run must act no more, whatever its lease says; renewals do not undo it.
    revoked: bool = False
    # Monotonic time of the last step of the pull under way; None between pulls.
    busy_since_progress: float | None = None
    # Set by the watchdog when it ends a hung run: the `error` of its `failed` event.
    hang: str | None = None
    # Told when a pull step begins or ends: the watchdog files busy runs by it.
    on_progress: Callable[["Run"], None] | None = None

    @property
    def identity(self) -> RunIdentity:
        return RunIdentity(config_id=self.config.id, run_id=self.run_id, fence=self.fence)

    def deadline(self) -> float:
        """The monotonic time after which the run sends and publishes nothing."""
        return float("-inf") if self.revoked else self.lease_deadline

    def check_lease(self) -> None:
        if self.revoked:
            raise LeaseLost(f"run {self.run_id} was revoked")
        if time.monotonic() >= self.lease_deadline:
            raise LeaseLost(f"lease of run {self.run_id} ran out before it was renewed")

    def revoke(self) -> None:
        self.revoked = True

    def progressed(self) -> None:
        """A step of the pull under way finished: the watchdog's clock starts again."""
        self.busy_since_progress = time.monotonic()
        if self.on_progress is not None:
            self.on_progress(self)


@dataclass(frozen=True, slots=True)
class LoopServices:
    source: OrderSource
    # Orders go through the sender of the run's configs partition.
    orders: TransactionalSenders
    store: Store
    orders_topic: str
    metrics: Metrics


def first_pull_jitter(interval: float) -> float:
    """The contract's jitter: at most 10% of the interval and at most 5 s."""
    return random.uniform(0.0, min(0.1 * interval, 5.0))


def orders_scope_of(partition: int | None) -> str:
    """The fencing scope of a run's orders: its config's partition of the configs topic."""
    return f"orders-p{partition}"


def _moved(run: Run) -> LeaseLost:
    """The run's partition went to another instance, which now holds its orders' scope."""
    if run.stop_reason is None:
        run.stop_reason = "reassigned"
    return LeaseLost(f"run {run.run_id}: its partition belongs to another instance now")


async def pull_loop(run: Run, services: LoopServices) -> None:
    interval = run.config.interval_seconds
    await asyncio.sleep(run.first_pull_delay + first_pull_jitter(interval))
    await _hold_orders_scope(run, services)
    while True:
        started = time.monotonic()
        labels = services.metrics.config_labels(run.config.id)
        run.progressed()
        try:
            await pull(run, services)
        except PullFailed:
            services.metrics.pull_errors.add(1, labels)
            raise
        services.metrics.pulls.add(1, labels)
        run.progressed()
        await _write(run, lambda: services.store.record_successful_pull(
            run.config.id,
            run_id=run.run_id,
            fence=run.fence,
            source=run.config,
            seconds_ago=time.monotonic() - started,
        ))
        run.busy_since_progress = None
        run.pulled += 1
        await asyncio.sleep(max(0.0, started + interval - time.monotonic()))


async def _hold_orders_scope(run: Run, services: LoopServices) -> None:
    """Fence every earlier holder of the run's orders scope before the first request."""
    run.check_lease()
    try:
        await services.orders.send_all(orders_scope_of(run.source_partition), services.orders_topic, [],
                                       deadline=run.deadline)
    except Expired:
        raise LeaseLost(f"the lease of run {run.run_id} ended before it could hold its "
                        f"orders' transactional id") from None
    except NotHeld:
        raise _moved(run) from None


async def pull(run: Run, services: LoopServices) -> None:
    """One pull: pages from the saved cursor until an empty page.

    The source is not trusted to end its paging: a page whose cursor repeats one of this
    pull, or a page past `max_pages_per_pull`, fails the pull before anything of it is
    published, and an order the pull already published is not published again.

    Each pull is the root of a trace of its own, linked to the run's start, so that a loop
    running for weeks does not make one endless trace.
    """
    links = [Link(run.start_context)] if run.start_context is not None else []
    with tracer.start_as_current_span(
        "pull",
        context=otel_context.Context(),
        kind=trace.SpanKind.INTERNAL,
        links=links,
        attributes={"config_id": run.config.id, "run_id": run.run_id, "fence": run.fence},
    ):
        guard = PagingGuard(cursor=run.cursor, channel_id=run.config.channel_id,
                            max_pages=services.source.max_pages_per_pull)
        while True:
            run.check_lease()
            page = await services.source.fetch_page(
                run.config,
                run=run.identity,
                cursor=run.cursor,
                may_send=run.check_lease,
            )
            if not page.orders:
                if page.next_cursor is not None and page.next_cursor != run.cursor:
                    await _uninterrupted(run, _save_cursor(run, services, page.next_cursor))
                return
            # A page whose cursor repeats, or one past the cap, fails the pull unpublished.
            fresh = guard.admit(page)
            run.progressed()
            run.check_lease()
            if fresh.orders:
                await _uninterrupted(run, _publish_page(run, services, fresh))
            else:
                # Every order of the page came earlier in this pull; the paging goes on.
                await _uninterrupted(run, _save_cursor(run, services, page.next_cursor))
            run.progressed()


async def _publish_page(run: Run, services: LoopServices, page: Page) -> None:
    run.check_lease()
    config = run.config
    with producer_span("send", services.orders_topic,
                       attributes={"config_id": config.id, "run_id": run.run_id,
                                   "messaging.batch.message_count": len(page.orders)}):
        await _send_orders(run, services, page)
    run.orders_published += len(page.orders)
    services.metrics.orders.add(len(page.orders), services.metrics.config_labels(config.id))
    assert page.next_cursor is not None  # parse_page refuses orders without a cursor
    await _save_cursor(run, services, page.next_cursor)


async def _send_orders(run: Run, services: LoopServices, page: Page) -> None:
    config = run.config
    headers = [("config-id", config.id.encode()), ("run-id", run.run_id.encode())]
    traceparent = _traceparent()
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    records = [
        OutgoingRecord(
            key=f"{config.channel_id}:{order['id']}".encode(),
            value=json.dumps(order, separators=(",", ":"), ensure_ascii=False).encode(),
            headers=headers,
        )
        for order in page.orders
    ]
    try:
        await services.orders.send_all(orders_scope_of(run.source_partition), services.orders_topic, records,
                                       deadline=run.deadline)
    except (MessageSizeTooLargeError, RecordTooLargeError):
        largest, order = max(zip((len(r.value or b"") for r in records), page.orders),
                             key=lambda pair: pair[0])
        raise PullFailed(
            f"order {str(order.get('id'))[:80]!r} is {largest} bytes, more than the broker "
            f"takes in one record; the source must send it smaller (its cursor stays before "
            f"it, so every run stops here until it does)"
        ) from None
    except Expired:
        raise LeaseLost(f"the lease of run {run.run_id} ended before Kafka acknowledged "
                        f"its orders; they are dropped") from None
    except NotHeld:
        raise _moved(run) from None


async def _save_cursor(run: Run, services: LoopServices, cursor: str) -> None:
    await _write(run, lambda: services.store.save_cursor(
        run.config.id, run_id=run.run_id, fence=run.fence, source=run.config, cursor=cursor
    ))
    run.cursor = cursor


async def _write(run: Run, operation: Callable[[], Awaitable[None]]) -> None:
    """A run's own database write, retried while its lease lasts.

    The database being away is not the run's failure: the run keeps trying until its lease
    deadline, and then stops as `lease-lost` like every run whose lease cannot be renewed.
    A stale fencing number is final.
    """
    delay = 0.1
    level = logging.WARNING
    while True:
        run.check_lease()
        try:
            await operation()
            return
        except (Fenced, asyncio.CancelledError):
            raise
        except Exception as error:
            log.log(
                level,
                "could not write to the database (%s); retrying in %.1f s while the lease lasts",
                " ".join(str(error).split()) or type(error).__name__,
                delay,
                extra={"config_id": run.config.id, "run_id": run.run_id},
            )
            level = logging.DEBUG  # once per run is enough to tell the outage
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


async def _uninterrupted(run: Run, coro) -> None:
    """Finish `coro` even if the caller is cancelled meanwhile, then re-raise the cancel.

    Past `CRITICAL_SECTION_SECONDS` after the cancel the run is revoked and the section
    cancelled: its unacknowledged orders are dropped, and a database write it waits on is
    abandoned (asyncpg returns the connection to its pool), so the section ends promptly.
    """
    inner = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(inner)
    except asyncio.CancelledError:
        if not inner.done():
            done, _ = await asyncio.wait({inner}, timeout=CRITICAL_SECTION_SECONDS)
            if not done:
                log.warning("a publish-and-save section did not finish within %.0f s of the "
                            "stop; its unacknowledged orders are dropped",
                            CRITICAL_SECTION_SECONDS,
                            extra={"config_id": run.config.id, "run_id": run.run_id})
                run.revoke()
                inner.cancel()
                done, _ = await asyncio.wait({inner}, timeout=REVOKED_SECTION_SECONDS)
            if done:
                error = None if inner.cancelled() else inner.exception()
                if error is not None and not isinstance(error, LeaseLost):
                    log.warning("a publish-and-save section failed while stopping: %s", error)
            else:
                inner.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


def _traceparent() -> str | None:
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")
