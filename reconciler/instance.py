"""One reconciler instance: the configs stream in, reconciles in the middle, loops out.

The flow, in the order `start` sets it up:

1. The store connects and migrates the schema; the topics are created if missing.
2. The publisher (orders, events, DLQ), the order source, the outbox relay and the
   supervisor of loops start; reconcile workers wait on the keyed work queue.
3. The configs stream joins the consumer group. For every record of an assigned partition
   `handle_record` decodes it (invalid records go to the DLQ), stores the desired state by
   the version rules and only then returns, so the offset is acknowledged after the write.
   An applied record puts the config's id in the queue.
4. A worker takes an id and reconciles it: read desired and actual state, `decide`, act.
   Waiting actions (a held lease, a backoff, a slow stop) schedule the id again.
5. Beside them: lease renewal in batched statements (2,000 runs each), a watchdog for
   lease deadlines, and a periodic jittered resync that queues every owned config so drift
   heals by itself.

`stop` shuts down in the reverse order: leave the group, let the workers finish, stop
every loop with reason `shutdown`, record their ends, send the outbox, release the leases.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from typing import Awaitable, Callable, TypeVar

from aiokafka.errors import MessageSizeTooLargeError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import inject

from streams.config_stream import ConfigRecord, ConfigStream, find_unreadable
from streams.lenient_records import printable_header_name, undecodable_header_names
from streams.configs import Config, InvalidRecord, decode_config_record, shorten
from streams.connection import KafkaConnection
from streams.lifecycle import EVENT_FAILED, EVENT_STARTED, EVENT_STOPPED, lifecycle_event
from streams.publisher import OutgoingRecord, Publisher
from streams.transactions import (
    TransactionalSender,
    TransactionalSenders,
    quiet_fenced_producers,
)
from streams.topics import Topics, ensure_topics
from streams.tracing import processing_span, producer_span
from reconciler.cancellation import keep_running, raise_if_cancelling
from reconciler.compare import Action, Decision, Desired, LocalRun, RecordedRun, decide
from reconciler.http import HttpEndpoints
from reconciler.loop import LoopServices, Run, orders_scope_of
from reconciler.metrics import Metrics, otlp_metric_reader
from reconciler.outbox import IDLE_IN_BATCH_SECONDS, OutboxRelay
from reconciler.settings import Settings
from reconciler.source import OrderSource
from reconciler.store import LEASE_CHANNEL, Store, TaskRow
from reconciler.supervisor import Ending, Supervisor
from reconciler.telemetry import flushed, telemetry_resource
from reconciler.versions import Verdict
from reconciler.workqueue import KeyedWorkQueue, QueueShutDown

log = logging.getLogger(__name__)
tracer = trace.get_tracer("reconciler.instance")

T = TypeVar("T")

# The outbox relay of an instance sends only while its broker answered this recently, so an
# instance cut off from Kafka leaves the deployment's events to the others.
BROKER_RECENTLY_SECONDS = 5.0
# How long a shutdown waits for the group to be left before it ends the runs anyway.
LEAVING_FIRST_SECONDS = 5.0
# The longest reason a DLQ record's `error` header and the log quote whole (longer ones are
# cut, saying how long they were).
MAX_REASON_CHARS = 1000
# Ends of stopped runs recorded by one statement at most (a shutdown ends them all).
STOPS_PER_STATEMENT = 2000


def kafka_connection(settings: Settings) -> KafkaConnection:
    return KafkaConnection(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        security_protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=settings.kafka_sasl_password,
        ssl_cafile=settings.kafka_ssl_cafile,
    )


def backoff_delay(attempt: int, *, initial: float, cap: float) -> float:
    """Delay before the run after failed attempt `attempt` (1, 2, …): doubling, jittered.

    The jitter only ever adds (up to a quarter), so each delay is longer than the one
    before until the cap.
    """
    base = initial * 2 ** min(attempt - 1, 60)
    return min(cap, base * random.uniform(1.0, 1.25))


class Instance:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id
        self.boot_id = uuid.uuid4().hex
        self.topics = Topics(settings.topic_prefix)
        self.queue = KeyedWorkQueue()
        self.metrics = Metrics(
            resource=telemetry_resource(
                service_name=settings.otel_service_name, instance_id=settings.instance_id
            ),
            otlp_reader=otlp_metric_reader(enabled=settings.otlp_metrics_enabled),
            per_config=settings.metrics_per_config,
        )
        self.http: HttpEndpoints | None = None
        self._not_running = 0
        self._outbox_depth = 0
        self.assigned: set[int] = set()
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        self.orders: TransactionalSenders | None = None
        self.events: TransactionalSender | None = None
        self.source: OrderSource | None = None
        self.relay: OutboxRelay | None = None
        self.supervisor: Supervisor | None = None
        self.stream: ConfigStream | None = None
        self.joined = asyncio.Event()
        # Set, with the reason, when this instance must not go on: the process stops as on
        # SIGTERM and exits with an error.
        self.must_stop = asyncio.Event()
        self.must_stop_because: str | None = None
        # Configs whose start waits for another run's lease: a release wakes them at once.
        self._waiting_for_lease: set[str] = set()
        self._last_assignment: set[int] = set()
        self._kafka_connection: KafkaConnection | None = None
        self._generation = 0
        self._reclaim_everything = False
        # Monotonic time of the last successful call to the broker, for the cut-off check.
        self._kafka_seen = time.monotonic()
        self.kafka_cut_off = False
        self._last_failure_logged = 0.0
        # Span context of the record that asked for each pending reconcile.
        self._triggers: dict[str, trace.SpanContext] = {}
        self._started = False
        self._background: list[asyncio.Task] = []
        self._workers: list[asyncio.Task] = []
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        quiet_fenced_producers(asyncio.get_running_loop())
        connection = self._kafka_connection = kafka_connection(settings)
        self.store = await Store.connect(
            settings.database_url,
            instance_id=self.instance_id,
            boot_id=self.boot_id,
            pool_size=settings.db_pool_size,
            timeout=settings.db_timeout_seconds,
            static_member_id=settings.static_member_id,
        )
        await self.store.migrate()
        await self.store.heartbeat(partitions=[], runs=0)
        await ensure_topics(connection, self.topics, config_partitions=settings.config_partitions)

        self.publisher = Publisher(connection)
        await self.publisher.start()
        # Transactional ids shared by every instance of the deployment: the broker fences
        # whoever held one before (see `streams.transactions`).
        # A scope is started again only for a partition this instance owns, so a run of a
        # partition that moved away never takes the id back from the new owner.
        self.orders = TransactionalSenders(
            connection, settings.group_id, transaction_timeout=settings.lease_seconds,
            may_hold=self._may_hold_orders_scope,
        )
        self.events = TransactionalSender(connection, f"{settings.group_id}.task-events",
                                          transaction_timeout=IDLE_IN_BATCH_SECONDS)
        self.source = OrderSource.from_settings(settings)
        await self.source.start()
        self.relay = OutboxRelay(
            store=self.store, sender=self.events, publisher=self.publisher,
            connection=connection, topic=self.topics.task_events,
            may_send=self._broker_recently_reached,
        )
        self.supervisor = Supervisor(
            services=LoopServices(
                source=self.source,
                orders=self.orders,
                store=self.store,
                orders_topic=self.topics.orders,
                metrics=self.metrics,
            ),
            store=self.store,
            on_run_ended=self.queue.add,
            lease_seconds=settings.lease_seconds,
            lease_margin_seconds=settings.lease_margin_seconds,
            stop_timeout=settings.stop_timeout_seconds,
            hang_grace=settings.hang_grace_seconds,
        )
        self._background = [
            keep_running(work, name=name) for work, name in [
                (self.relay.run, "outbox-relay"),
                (self._renew_leases_forever, "lease-renewal"),
                (self._watch_deadlines_forever, "lease-watchdog"),
                (self._resync_forever, "resync"),
                (self._listen_for_releases_forever, "lease-releases"),
                (self._watch_kafka_forever, "kafka-watch"),
                (self._sample_table_forever, "table-gauges"),
                (self._watch_stream_forever, "configs-stream-watch"),
            ]
        ]
        self._register_gauges()
        if settings.http_port:
            self.http = HttpEndpoints(
                port=settings.http_port,
                host=settings.http_host,
                joined=self._consuming,
                database_answers=self._database_answers,
                metrics_text=self.metrics.prometheus_text,
            )
            await self.http.start()
        self._workers = [
            asyncio.create_task(self._work_forever(), name=f"reconcile-worker-{n}")
            for n in range(settings.reconcile_workers)
        ]
        self.stream = ConfigStream(
            connection=connection,
            topic=self.topics.configs,
            group_id=settings.group_id,
            handle_record=self.handle_record,
            on_assigned=self._partitions_assigned,
            on_revoked=self._partitions_revoked,
            session_timeout=settings.kafka_session_timeout_seconds,
            heartbeat_interval=settings.kafka_heartbeat_seconds,
            static_member_id=settings.static_member_id,
        )
        await self.stream.start()
        self._started = True
        log.info("instance started", extra={"instance_id": self.instance_id})

    async def stop(self) -> float:
        """Graceful shutdown: every local run ends with `shutdown` and releases its lease.
        Returns what is left of the budget (5 s at most), for flushing traces.

        Each step is bounded, and all of them together by `shutdown_timeout_seconds`: with
        the broker or the database unreachable a step gives up, and what it left undone is
        done by others (the next owner ends a run as `lease-expired`; events wait in the
        outbox for the next relay)."""
        self._stopping = True
        budget = ShutdownBudget(self.settings.shutdown_timeout_seconds)
        # Leaving the group first lets the successors start at once. With the broker away
        # it cannot finish: the runs are ended meanwhile, and it gets what is left at the end.
        leaving = asyncio.ensure_future(self.stream.stop()) if self.stream is not None else None
        reachable = self.publisher is not None and await self.publisher.reaches_broker(
            timeout=1.0)
        if leaving is not None:
            await asyncio.wait({leaving}, timeout=budget.allow(
                LEAVING_FIRST_SECONDS if reachable else 0.0))
        self.queue.shut_down()
        if self._workers:
            await asyncio.wait(self._workers,
                               timeout=budget.allow(self.settings.stop_timeout_seconds))
            for worker in self._workers:
                worker.cancel()
        if self.supervisor is not None:
            await self.supervisor.cancel_all(
                reason="shutdown", timeout=budget.allow(self.settings.stop_timeout_seconds))
            # All ends at once, under one bound: with the database unreachable, one bound per
            # run would hold the shutdown for minutes. An end not recorded here is recorded
            # by the next owner (`lease-expired`).
            ended = [run for run in self.supervisor.runs.values() if run.task.done()]
            if ended:
                await budget.spend(self._finish_runs(ended), 10.0,
                                   f"recording the ends of {len(ended)} runs")
        if self.relay is not None and self.store is not None:
            # Its own timeout is checked between queries; a query to a database that stopped
            # answering waits for the database timeout, so the budget bounds it as well.
            await budget.spend(self.relay.wait_until_sent(timeout=budget.allow(5.0)), 5.0,
                               "sending the last lifecycle events")
        if self.store is not None:
            await budget.spend(
                self.store.heartbeat(partitions=[], runs=0, stopped=True), 5.0,
                "recording this instance as stopped",
            )
        for task in self._background:
            task.cancel()
        if self._background:
            # A task cleaning up a connection the database dropped must not hold the stop.
            await asyncio.wait(self._background, timeout=budget.allow(5.0))
        if self.source is not None:
            await budget.spend(self.source.close(), 5.0, "closing the order source's client")
        # Closing what is left shares the rest of the budget; with a server away each close
        # only gives up.
        if leaving is not None:
            await budget.spend(leaving, 10.0 if reachable else 1.0,
                               "leaving the consumer group")
        closing = [(self.orders and self.orders.close(), "closing the orders' producers"),
                   (self.events and self.events.close(), "closing the events' producer"),
                   (self.publisher and self.publisher.stop(), "stopping the producer"),
                   (self.store and self.store.close(), "closing the database pool"),
                   (self.http and self.http.stop(), "closing the HTTP endpoints")]
        await asyncio.gather(*(budget.spend(work, 10.0, what)
                               for work, what in closing if work is not None))
        await budget.spend(flushed(self.metrics.shutdown), 5.0, "exporting the last metrics")
        if self._started:
            log.info("instance stopped", extra={"instance_id": self.instance_id})
        return budget.allow(5.0)

    # ---- the configs stream --------------------------------------------------------------

    async def handle_record(self, record: ConfigRecord) -> None:
        """Store one config record's effect durably; return only when that is done."""
        with processing_span(
            self.topics.configs, headers=record.headers, key=record.key,
            partition=record.partition, offset=record.offset, group=self.settings.group_id,
        ) as span:
            if record.key:
                span.set_attribute("config_id", record.key.decode("utf-8", "replace"))
            await self._handle_record(record)

    async def _handle_record(self, record: ConfigRecord) -> None:
        undecodable = undecodable_header_names(record.headers)
        if undecodable:
            named = ", ".join(shorten(name, 64) for name in undecodable[:3])
            more = f" and {len(undecodable) - 3} more" if len(undecodable) > 3 else ""
            await self._dead_letter(
                record,
                f"header name {named}{more} is not UTF-8 text, which Kafka requires of "
                "header names; the record was not parsed",
            )
            return
        size = record_size(record)
        limit = self.settings.max_record_bytes
        if size > limit:
            await self._dead_letter(
                record,
                f"record is {size} bytes with its key and headers, over the {limit}-byte limit "
                "(RECONCILER_MAX_RECORD_BYTES); it was not parsed",
            )
            return
        try:
            decoded = decode_config_record(record.key, record.value, max_record_bytes=limit)
        except InvalidRecord as invalid:
            await self._dead_letter(record, invalid.reason)
            return

        assert self.store is not None
        # Limitation: while the database is away this retries without end, so this
        # instance's partitions stall and a rebalance waits until the broker drops it.
        written = await self._retry_database(
            lambda: self.store.write_desired(
                decoded,
                partition=record.partition,
                offset=record.offset,
                record_time=record.timestamp,
            ),
            what=f"storing the desired state of {decoded.id}",
        )
        verdict = written.judgement.verdict
        if verdict is Verdict.REJECT:
            await self._dead_letter(record, f"{decoded.id}: {written.judgement.why}")
        elif verdict is Verdict.IGNORE:
            log.info(
                "record ignored: %s",
                written.judgement.why,
                extra={"config_id": decoded.id, "partition": record.partition,
                       "offset": record.offset},
            )
            # The row may hold this very change, written by the partition's previous owner
            # after this instance's claim looked at the row: look at the config all the same.
            self.queue.add(decoded.id)
        else:
            # The reconcile this record asks for continues the record's trace.
            self._triggers[decoded.id] = trace.get_current_span().get_span_context()
            self.queue.add(decoded.id)

    async def _dead_letter(self, record: ConfigRecord, reason: str) -> None:
        assert self.publisher is not None
        # Reasons quote what the record holds; a hostile record must not make the reason
        # (and the log line) as large as itself.
        reason = shorten(reason, MAX_REASON_CHARS)
        log.warning(
            "record sent to the DLQ: %s",
            reason,
            extra={"partition": record.partition, "offset": record.offset},
        )
        self.metrics.dlq_records.add(1)
        source = [
            ("error", reason.encode()),
            ("source-topic", self.topics.configs.encode()),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
        ]
        carried = [(printable_header_name(k), v) for k, v in record.headers
                   if k not in _DLQ_HEADERS]
        # The copy must fit the broker's limit even though it carries more headers than the
        # original: drop the original headers first, then cut the value, and say so.
        attempts = [
            OutgoingRecord(key=record.key, value=record.value, headers=carried + source),
            OutgoingRecord(key=record.key, value=record.value,
                           headers=source + [("dropped", b"the original headers, too large")]),
            OutgoingRecord(key=record.key[:1024] if record.key else record.key,
                           value=(record.value or b"")[:65536] if record.value else record.value,
                           headers=source + [("dropped", b"the original headers; the key and "
                                                         b"value are cut, too large")]),
        ]
        for copy in attempts:
            try:
                await self._retry_kafka(
                    lambda: self.publisher.send(self.topics.dlq, copy),
                    what="sending a record to the DLQ",
                )
                return
            except MessageSizeTooLargeError:
                continue
        log.error("the DLQ copy of the record at offset %d of partition %d was refused as too "
                  "large even cut down; it is not in the DLQ", record.offset, record.partition)

    async def _partitions_assigned(self, partitions: set[int], generation: int) -> None:
        if self._stopping:
            return  # leaving the group: the shutdown stops every run with `shutdown`
        self._last_assignment = set(partitions)
        self._generation = generation
        self.metrics.rebalances.add(1)
        lost = self.assigned - partitions
        gained = partitions - self.assigned
        if self._reclaim_everything:
            # After a cut-off, rows of every assigned partition may have moved meanwhile.
            gained = set(partitions)
            self._reclaim_everything = False
        self.assigned = set(partitions)
        self.joined.set()
        log.info("partitions assigned in generation %d: %s (gained %s, lost %s)", generation,
                 sorted(partitions), sorted(gained), sorted(lost))
        assert self.store is not None and self.supervisor is not None
        # Runs of lost partitions stop (`reassigned`) and release their leases promptly.
        for config_id, run in list(self.supervisor.runs.items()):
            if run.source_partition in lost:
                self.queue.add(config_id)
        if not partitions:
            return
        # Claim every assigned partition, not only the gained ones: a claim from an older
        # generation by another instance may have landed after ours.
        await self._retry_database(
            lambda: self.store.claim_partitions(sorted(partitions), generation=generation),
            what="claiming the assigned partitions",
        )
        if gained:
            ids = await self._retry_database(
                lambda: self.store.config_ids(partitions=sorted(gained), held_by_me=True),
                what="listing the configs of gained partitions",
            )
            for config_id in ids:
                self.queue.add(config_id)

    async def _partitions_revoked(self, partitions: set[int]) -> None:
        # Eager rebalancing revokes everything at each membership change; runs keep going
        # until the new assignment says which partitions were really lost.
        log.info("partitions revoked: %s", sorted(partitions))

    # ---- reconcile -----------------------------------------------------------------------

    async def _work_forever(self) -> None:
        while True:
            try:
                config_id = await self.queue.get()
            except QueueShutDown:
                return
            started = time.monotonic()
            try:
                await self.reconcile(config_id)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                raise_if_cancelling()
                self.metrics.reconciles.add(1, {"action": "error"})
                delay = 1.0 + random.random()
                # During an outage every reconcile fails the same way: say it once a while.
                now = time.monotonic()
                level = logging.WARNING if now - self._last_failure_logged > 10 else logging.DEBUG
                if level == logging.WARNING:
                    self._last_failure_logged = now
                log.log(
                    level,
                    "reconcile failed (%s); retrying in %.1f s (further failures within 10 s "
                    "are logged at debug level)",
                    " ".join(str(error).split()) or type(error).__name__,
                    delay,
                    extra={"config_id": config_id},
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                self.queue.add_after(config_id, delay)
            finally:
                self.metrics.reconcile_duration.record(time.monotonic() - started)
                self.queue.done(config_id)

    async def reconcile(self, config_id: str) -> None:
        assert self.store is not None and self.supervisor is not None
        trigger = self._triggers.pop(config_id, None)
        parent = (
            trace.set_span_in_context(trace.NonRecordingSpan(trigger))
            if trigger is not None else otel_context.Context()
        )
        with tracer.start_as_current_span(
            "reconcile", context=parent, attributes={"config_id": config_id}
        ):
            local = self.supervisor.runs.get(config_id)
            if local is not None and local.task.done():
                await self._finish_run(local)
                local = None

            row = await self.store.read(config_id)
            decision = decide(
                desired=self._desired(row),
                local=self._local(local, row),
                recorded=self._recorded(row, local),
            )
            self.metrics.reconciles.add(1, {"action": decision.action.value})
            if (
                decision.action in (Action.START, Action.STOP, Action.RESTART)
                and row is not None
                and row.record_age is not None
                and math.isfinite(row.record_age)
            ):
                self.metrics.action_lag.record(max(0.0, row.record_age))
            await self._act(config_id, decision, row)

    def _desired(self, row: TaskRow | None) -> Desired | None:
        if row is None:
            return None
        assigned = row.source_partition in self.assigned
        return Desired(
            enabled=row.enabled,
            deleted=row.deleted,
            assigned=assigned,
            content_key=_content_key(row),
        )

    @staticmethod
    def _local(local: Run | None, row: TaskRow | None) -> LocalRun | None:
        if local is None:
            return None
        return LocalRun(
            content_key=_content_key_of_config(local.config),
            ending=local.stop_reason is not None,
        )

    @staticmethod
    def _recorded(row: TaskRow | None, local: Run | None) -> RecordedRun:
        if row is None:
            return RecordedRun(foreign_active=False, lease_remaining=0.0, backoff_remaining=0.0)
        foreign = row.run_active and (local is None or row.run_id != local.run_id)
        return RecordedRun(
            foreign_active=foreign,
            lease_remaining=row.lease_remaining or 0.0,
            backoff_remaining=row.backoff_remaining,
        )

    async def _act(self, config_id: str, decision: Decision, row: TaskRow | None) -> None:
        assert self.supervisor is not None
        action = decision.action
        if action is Action.NOTHING or action is Action.WAIT_FOR_STOP:
            local = self.supervisor.runs.get(config_id)
            if (
                action is Action.NOTHING
                and local is not None
                and row is not None
                and row.config is not None
                and row.config_version != local.config.version
            ):
                # Same content under a new version: the run goes on under the version the
                # table now holds (which its later events name).
                local.config = row.config
            return
        if action in (Action.WAIT_FOR_LEASE, Action.WAIT_FOR_BACKOFF):
            if action is Action.WAIT_FOR_LEASE:
                self._waiting_for_lease.add(config_id)
            self.queue.add_after(config_id, decision.retry_after or 0.0)
            return
        self._waiting_for_lease.discard(config_id)
        if action is Action.END_EXPIRED:
            await self._end_expired(config_id)
            self.queue.add(config_id)
            return
        if action in (Action.STOP, Action.RESTART):
            await self._stop(config_id, reason=decision.reason)
            if action is Action.RESTART:
                self.queue.add(config_id)
            return
        if action is Action.START:
            await self._start(
                config_id,
                partition=row.source_partition if row else None,
                version=row.config_version if row else None,
            )

    async def _start(
        self, config_id: str, *, partition: int | None, version: int | None
    ) -> None:
        assert self.store is not None and self.supervisor is not None
        run_id = uuid.uuid4().hex
        taken_at = time.monotonic()

        def started(fence: int) -> dict:
            return self._event(EVENT_STARTED, config_id, run_id=run_id, fence=fence,
                               config_version=version)

        with tracer.start_as_current_span(
            "start", attributes={"config_id": config_id, "run_id": run_id}
        ) as start_span:
            with tracer.start_as_current_span(
                "lease", attributes={"config_id": config_id, "run_id": run_id}
            ) as lease_span:
                lease = await self.store.take_lease(
                    config_id,
                    run_id=run_id,
                    lease_seconds=self.settings.lease_seconds,
                    started_event=lambda fence: started(fence),
                )
                lease_span.set_attribute("lease.taken", lease is not None)
                if lease is not None:
                    lease_span.set_attribute("fence", lease.fence)
            start_context = start_span.get_span_context()
        if lease is None:
            # The row changed since it was read (a lease holder appeared, another instance
            # claimed the partition, or it was disabled); look again when the lease is
            # released or can have expired.
            self._waiting_for_lease.add(config_id)
            self.queue.add_after(config_id, self.settings.lease_seconds)
            return
        run = self.supervisor.start(lease, lease_taken_at=taken_at)
        run.start_context = start_context
        self.metrics.runs_started.add(1)
        run.source_partition = partition
        self.relay.wake()
        log.info(
            "run started",
            extra={"config_id": config_id, "run_id": run_id, "fence": lease.fence,
                   "instance_id": self.instance_id},
        )

    async def _stop(self, config_id: str, *, reason: str) -> None:
        assert self.store is not None and self.supervisor is not None
        run = self.supervisor.runs[config_id]
        with tracer.start_as_current_span(
            "stop", attributes={"config_id": config_id, "run_id": run.run_id, "reason": reason}
        ):
            ended = await self.supervisor.stop(config_id, reason=reason)
            if ended:
                await self._finish_run(run)
            else:
                await self.store.mark_stopping(config_id, run_id=run.run_id, fence=run.fence)

    async def _finish_runs(self, runs: list[Run]) -> None:
        """Record the ends of local runs whose tasks have ended: the stopped ones in
        statements of up to `STOPS_PER_STATEMENT` (a shutdown ends every run at once), the
        others one by one."""
        assert self.supervisor is not None
        stopped: list[Run] = []
        rest: list[Run] = []
        for run in runs:
            stopped_run = self.supervisor.outcome_of(run).ending is Ending.STOPPED
            (stopped if stopped_run else rest).append(run)
        results = await asyncio.gather(
            *(self._record_stops(stopped[first:first + STOPS_PER_STATEMENT])
              for first in range(0, len(stopped), STOPS_PER_STATEMENT)),
            *(self._finish_run(run) for run in rest),
            return_exceptions=True,
        )
        failed = [error for error in results if isinstance(error, Exception)]
        if failed:
            raise failed[0]

    async def _finish_run(self, run: Run) -> None:
        """Record the end of a local run whose task has ended, releasing its lease."""
        assert self.store is not None and self.supervisor is not None and self.relay is not None
        config_id = run.config.id
        outcome = self.supervisor.outcome_of(run)
        if outcome.ending is Ending.STOPPED:
            await self._record_stops([run])
            return
        if outcome.ending is Ending.FENCED:
            log.warning("run ended: its lease was taken over",
                        extra={"config_id": config_id, "run_id": run.run_id,
                               "instance_id": self.instance_id})
            self.supervisor.remove(config_id)
            return
        delays: dict[int, float] = {}

        def retry_delay(attempt: int) -> float:
            delay = backoff_delay(
                attempt,
                initial=self.settings.backoff_initial_seconds,
                cap=self.settings.backoff_max_seconds,
            )
            if outcome.retry_after is not None:
                delay = min(self.settings.backoff_max_seconds, max(delay, outcome.retry_after))
            delays[attempt] = delay
            return delay

        await self.store.fail_run(
            config_id,
            run_id=run.run_id,
            fence=run.fence,
            error=outcome.error,
            retry_in=retry_delay,
            end_event=lambda attempt: self._event(
                EVENT_FAILED, config_id, run_id=run.run_id, fence=run.fence,
                config_version=run.config.version, error=outcome.error, attempt=attempt,
                retry_in_seconds=round(delays[attempt], 3),
            ),
        )
        retry_in = next(iter(delays.values()), None)
        log.warning("run failed: %s; next run in %.1f s", outcome.error, retry_in or 0.0,
                    extra={"config_id": config_id, "run_id": run.run_id,
                           "instance_id": self.instance_id})
        self.supervisor.remove(config_id)
        self.metrics.runs_ended.add(1, {"type": "failed", "reason": "none"})
        # The lease went with the end, in its transaction (see `Store.fail_run`).
        self.relay.wake()
        if retry_in is not None:
            self.queue.add_after(config_id, retry_in)

    async def _record_stops(self, runs: list[Run]) -> None:
        """Record the ends of stopped local runs in one statement (see `Store.stop_runs`)."""
        assert self.store is not None and self.supervisor is not None and self.relay is not None
        reasons = {run.config.id: self.supervisor.outcome_of(run).reason for run in runs}
        await self.store.stop_runs([
            (run.config.id, run.run_id, run.fence,
             self._event(EVENT_STOPPED, run.config.id, run_id=run.run_id, fence=run.fence,
                         config_version=run.config.version, reason=reasons[run.config.id]))
            for run in runs
        ])
        for run in runs:
            reason = reasons[run.config.id]
            self.supervisor.remove(run.config.id)
            log.info("run stopped (%s)", reason,
                     extra={"config_id": run.config.id, "run_id": run.run_id,
                            "instance_id": self.instance_id})
            self.metrics.runs_ended.add(1, {"type": "stopped", "reason": reason})
            if reason == "lease-lost":
                self.metrics.lease_losses.add(1)
        # The leases went with the ends, in their statement.
        self.relay.wake()

    async def _end_expired(self, config_id: str) -> None:
        assert self.store is not None and self.relay is not None

        def stopped(run_id: str, owner: str | None, fence: int, version: int | None) -> dict:
            return self._event(
                EVENT_STOPPED, config_id, run_id=run_id, fence=fence, config_version=version,
                reason="lease-expired", ran_by=owner,
            )

        if await self.store.end_expired_run(config_id, end_event=stopped):
            log.info("ended a run whose lease expired", extra={"config_id": config_id,
                                                               "reason": "lease-expired"})
            self.relay.wake()

    def _event(
        self,
        event_type: str,
        config_id: str,
        *,
        run_id: str,
        fence: int,
        config_version: int | None = None,
        reason: str | None = None,
        error: str | None = None,
        attempt: int | None = None,
        retry_in_seconds: float | None = None,
        ran_by: str | None = None,
    ) -> dict:
        carrier: dict[str, str] = {}
        with producer_span("create", self.topics.task_events, key=config_id,
                           attributes={"config_id": config_id, "run_id": run_id,
                                       "cloudevents.event_type": event_type}):
            inject(carrier)
        return lifecycle_event(
            event_type=event_type,
            config_id=config_id,
            run_id=run_id,
            instance_id=ran_by or self.instance_id,
            emitter_id=self.instance_id,
            fence=fence,
            config_version=config_version,
            reason=reason,
            error=error,
            attempt=attempt,
            retry_in_seconds=retry_in_seconds,
            traceparent=carrier.get("traceparent"),
        )

    # ---- background duties ---------------------------------------------------------------

    async def _renew_leases_forever(self) -> None:
        assert self.supervisor is not None and self.store is not None
        while True:
            await asyncio.sleep(self.settings.lease_renew_seconds)
            try:
                await self.supervisor.renew_leases()
                await self.store.heartbeat(
                    partitions=sorted(self.assigned), runs=len(self.supervisor.runs)
                )
                await self._give_way_to_a_newer_member()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                raise_if_cancelling()
                log.warning(
                    "could not renew leases (%s); runs stop at their lease deadline unless "
                    "the next renewal succeeds",
                    " ".join(str(error).split()) or type(error).__name__,
                )

    async def _give_way_to_a_newer_member(self) -> None:
        """Two live processes with one static member id take the member from each other at
        every join (the broker fences the older, which joins again), so neither keeps its
        partitions. The broker gives the member to the newest; the older one stops."""
        assert self.store is not None
        if self.must_stop.is_set():
            return
        newer = await self.store.newer_process_with_our_member_id(
            seen_within=self.settings.lease_seconds)
        if newer is None:
            return
        self.must_stop_because = (
            f"instance {shorten(newer, 80)} started later with the same "
            f"RECONCILER_STATIC_MEMBER_ID ({shorten(self.settings.static_member_id or '', 80)}); "
            "the consumer group cannot keep two members with one id, so this one stops: "
            "give every instance its own"
        )
        log.error("%s", self.must_stop_because, extra={"instance_id": self.instance_id})
        self.must_stop.set()

    async def _listen_for_releases_forever(self) -> None:
        """Start a config the moment the run holding its lease releases it."""
        assert self.store is not None

        def released(_conn: object, _pid: int, _channel: str, config_id: str) -> None:
            if config_id in self._waiting_for_lease:
                self.queue.add(config_id)

        while True:
            try:
                async with self.store.pool.acquire() as conn:
                    await conn.add_listener(LEASE_CHANNEL, released)
                    try:
                        # Waiting configs are polled too, so nothing released while the
                        # connection was down stays waiting for long.
                        for config_id in list(self._waiting_for_lease):
                            self.queue.add(config_id)
                        while not conn.is_closed():
                            await asyncio.sleep(1.0)
                            await conn.execute("SELECT 1", timeout=5)
                    finally:
                        if not conn.is_closed():
                            await conn.remove_listener(LEASE_CHANNEL, released)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                raise_if_cancelling()
                log.warning("lost the lease-release listener (%s); reconnecting in 1 s",
                            " ".join(str(error).split()) or type(error).__name__)
                await asyncio.sleep(1.0)

    async def _watch_kafka_forever(self) -> None:
        """Stop every run when the broker has been unreachable for a session timeout.

        The group will have given this instance's partitions to another member by then;
        stopping at once lets the successor start without waiting for leases to expire.
        """
        assert self.publisher is not None
        limit = self.settings.kafka_session_timeout_seconds
        while True:
            await asyncio.sleep(1.0)
            reached = await self.publisher.reaches_broker(timeout=min(3.0, limit / 2))
            now = time.monotonic()
            if reached:
                self._kafka_seen = now
                if self.kafka_cut_off:
                    self.kafka_cut_off = False
                    log.warning("the broker is reachable again; resuming the last assignment "
                                "until the group says otherwise")
                    # If the group moved the partitions meanwhile, the new owner's claim
                    # (a newer generation) keeps this instance from taking their leases,
                    # and the next assignment corrects `assigned`.
                    self._reclaim_everything = True
                    await self._partitions_assigned(set(self._last_assignment),
                                                    self._generation)
                continue
            if not self.kafka_cut_off and now - self._kafka_seen >= limit:
                self.kafka_cut_off = True
                self._reclaim_everything = True
                log.error("the broker has been unreachable for %.0f s; stopping every run "
                          "(its partitions belong to another instance by now)", limit)
                self.assigned = set()
                # No waiting for acknowledgements that cannot come: each run is revoked,
                # its queued orders dropped, and its lease released by the reconcile.
                for config_id in list(self.supervisor.runs):
                    self.supervisor.abandon(config_id, reason="reassigned")
                    self.queue.add(config_id)

    def _consuming(self) -> bool:
        """A member of the group, reaching the broker, and still reading configs."""
        if self.stream is not None and self.stream.crash is not None:
            return False
        return self.joined.is_set() and not self.kafka_cut_off

    async def _watch_stream_forever(self) -> None:
        """Say once, loudly and with where it happened, that the configs stream stopped."""
        while self.stream is None or self.stream.crash is None:
            await asyncio.sleep(1.0)
        crash = self.stream.crash
        log.error("the configs stream stopped reading (%s); no config change is applied "
                  "until the record that stopped it is skipped and the instances restarted; "
                  "looking for it", " ".join(str(crash).split()) or type(crash).__name__)
        try:
            found = await find_unreadable(
                self._kafka_connection, topic=self.topics.configs,
                group_id=self.settings.group_id, partitions=set(self._last_assignment),
            )
        except Exception as error:
            raise_if_cancelling()
            log.error("could not look for the unreadable record (%s)",
                      " ".join(str(error).split()) or type(error).__name__)
            found = None
        for where in found:
            log.error("configs partition %d: a record at offset %d or later cannot be read "
                      "(%s); to skip it, stop every instance and move the group %s past its "
                      "record batch on that partition (README: Known limitations)",
                      where.partition, where.offset, where.error, self.settings.group_id)
        if found == []:
            log.error("no unreadable record found from the group's committed offsets of "
                      "partitions %s", sorted(self._last_assignment))
        while True:  # reported; nothing more to do until the restart
            await asyncio.sleep(3600)

    def _may_hold_orders_scope(self, scope: str) -> bool:
        owned = {orders_scope_of(partition) for partition in self.assigned}
        return scope in owned or scope == orders_scope_of(None)

    def _broker_recently_reached(self) -> bool:
        return time.monotonic() - self._kafka_seen < BROKER_RECENTLY_SECONDS

    async def _watch_deadlines_forever(self) -> None:
        assert self.supervisor is not None
        while True:
            await asyncio.sleep(0.25)
            self.supervisor.enforce_deadlines()

    async def _resync_forever(self) -> None:
        assert self.store is not None and self.supervisor is not None
        period = self.settings.resync_seconds
        while True:
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            try:
                ids = await self.store.config_ids(
                    partitions=sorted(self.assigned), held_by_me=True
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                raise_if_cancelling()
                log.warning("resync could not list configs (%s); trying again next period",
                            " ".join(str(error).split()))
                continue
            for config_id in set(ids) | set(self.supervisor.runs):
                self.queue.add_background(config_id)

    # ---- metrics and health --------------------------------------------------------------

    def _register_gauges(self) -> None:
        assert self.supervisor is not None
        supervisor = self.supervisor
        self.metrics.gauge("reconciler.runs.running", lambda: supervisor.running)
        self.metrics.gauge("reconciler.partitions.assigned", lambda: len(self.assigned))
        self.metrics.gauge("reconciler.configs.not_running", lambda: self._not_running)
        self.metrics.gauge("reconciler.outbox.depth", lambda: self._outbox_depth)

    async def _sample_table_forever(self) -> None:
        """Refresh the gauges that come from the table, at a pace the database can afford."""
        assert self.store is not None
        while True:
            try:
                self._not_running = await self.store.enabled_not_running(
                    longer_than=self.settings.not_running_threshold_seconds
                )
                self._outbox_depth = await self.store.outbox_depth()
            except asyncio.CancelledError:
                raise
            except Exception:
                raise_if_cancelling()
                pass  # the database being away is reported where it matters
            await asyncio.sleep(5.0)

    async def _database_answers(self) -> bool:
        assert self.store is not None
        return await self.store.pool.fetchval("SELECT 1", timeout=1.0) == 1

    # ---- retries -------------------------------------------------------------------------

    async def _retry_database(self, operation: Callable[[], Awaitable[T]], *, what: str) -> T:
        return await _retry_forever(operation, what=what)

    async def _retry_kafka(self, operation: Callable[[], Awaitable[T]], *, what: str) -> T:
        return await _retry_forever(operation, what=what)


_DLQ_HEADERS = {"error", "source-topic", "source-partition", "source-offset"}


async def _retry_forever(operation: Callable[[], Awaitable[T]], *, what: str) -> T:
    """Retry in short attempts with a capped, jittered delay; the record stays unacknowledged.

    A record the broker will never accept (too large) is not retried: the caller decides.
    """
    delay = 0.2
    while True:
        try:
            return await operation()
        except (asyncio.CancelledError, MessageSizeTooLargeError):
            raise
        except Exception as error:
            raise_if_cancelling()
            log.warning(
                "%s failed (%s); retrying in %.1f s",
                what,
                " ".join(str(error).split()) or type(error).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2) * random.uniform(0.8, 1.2)


class ShutdownBudget:
    """Time left for a shutdown; each step gets its own bound or what is left, if less."""

    def __init__(self, seconds: float) -> None:
        self._until = time.monotonic() + seconds

    def allow(self, seconds: float) -> float:
        return max(0.0, min(seconds, self._until - time.monotonic()))

    async def spend(self, awaitable: Awaitable, seconds: float, what: str) -> None:
        """Await `awaitable` within its bound. Past it the work is cancelled and left
        behind, not awaited: a library call that ignores its cancel (a consumer thread
        waiting for an unreachable broker) must not hold the shutdown."""
        work = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({work}, timeout=self.allow(seconds))
        if not done:
            work.cancel()
            work.add_done_callback(_retrieved)
            log.warning("%s did not finish within its bound; left behind", what)
            return
        error = None if work.cancelled() else work.exception()
        if error is not None:
            log.warning("%s did not finish cleanly: %s", what,
                        " ".join(str(error).split()) or type(error).__name__)


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def record_size(record: ConfigRecord) -> int:
    """Bytes of a record's key, value and headers, as the size limit counts them."""
    headers = sum(len(name.encode("utf-8", "surrogateescape")) + len(value)
                  for name, value in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers


def _content_key(row: TaskRow) -> str:
    if row.config is None:
        return ""
    return _content_key_of_config(row.config)


def _content_key_of_config(config: Config) -> str:
    content = config.normalised()
    content.pop("enabled", None)
    return json.dumps(content, sort_keys=True)

