"""The configs stream: a faust-streaming app whose one agent consumes `<p>.configs`.

The agent hands every record, valid or not, to the handler it was built with, in batches:
whatever has arrived while the previous batch was handled, up to `BATCH_RECORDS`. Within a
batch the records of different configs are handled at once (so the handler's database
writes can share one transaction) and the records of one config one after the other, in
partition order. The agent acknowledges a batch's records only when the handler has
returned for every one of them, and faust commits acknowledged offsets itself (never
aiokafka's timer-based auto-commit), so an offset is committed only after the handler made
the record's effect durable. A handler that cannot store a record keeps retrying; it never
returns early. A batch cut short (the agent stopped, a handler crashed) is not acknowledged.

Rebalance hooks report the partitions this instance now owns. aiokafka and faust rebalance
eagerly (every partition is revoked at each join or leave), so the hooks only report; what
to do about lost and gained partitions is decided by the caller.

faust is run as a service inside the caller's event loop (no faust worker, no web server):
the instance owns the process, its signals and its shutdown.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import tempfile
from dataclasses import dataclass
from typing import Awaitable, Callable

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from streams import lenient_records
from streams.connection import KafkaConnection
from streams.topics import replication_factor

log = logging.getLogger(__name__)

# Records handled, and acknowledged, together at most.
BATCH_RECORDS = 500


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp: dt.datetime | None
    headers: list[tuple[str, bytes]]


RecordHandler = Callable[[ConfigRecord], Awaitable[None]]
PartitionsHandler = Callable[[set[int]], Awaitable[None]]
AssignmentHandler = Callable[[set[int], int], Awaitable[None]]


class ConfigStream:
    def __init__(
        self,
        *,
        connection: KafkaConnection,
        topic: str,
        group_id: str,
        handle_record: RecordHandler,
        on_assigned: AssignmentHandler,
        on_revoked: PartitionsHandler,
        session_timeout: float = 10.0,
        heartbeat_interval: float = 3.0,
        static_member_id: str | None = None,
    ) -> None:
        self._connection = connection
        self._topic_name = topic
        self._handle_record = handle_record
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._datadir = tempfile.TemporaryDirectory(prefix="reconciler-faust-")
        # A record with a header name that is not UTF-8 is handed on (and refused there),
        # not left to stop the stream.
        lenient_records.install()
        _read_committed_records_only()
        self.app = faust.App(
            group_id,
            broker=connection.faust_broker(),
            broker_credentials=connection.faust_credentials(),
            datadir=self._datadir.name,
            web_enabled=False,
            topic_allow_declare=False,
            topic_disable_leader=False,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=session_timeout,
            broker_heartbeat_interval=heartbeat_interval,
            broker_rebalance_timeout=max(session_timeout * 2, 20.0),
            broker_commit_interval=1.0,
            stream_wait_empty=False,
            stream_buffer_maxsize=1024,
            key_serializer="raw",
            value_serializer="raw",
            consumer_group_instance_id=static_member_id,
            producer_acks=-1,
        )
        self._topic = self.app.topic(
            topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )
        self.app.agent(self._topic, name=f"{group_id}.configs-agent")(self._agent)
        self.app.on_partitions_assigned.connect(self._assigned)
        self.app.on_partitions_revoked.connect(self._revoked)
        self._started = False

    async def start(self) -> None:
        await self._create_leader_topic()
        self.app.finalize()
        await self.app.start()
        self._started = True

    @property
    def crash(self) -> BaseException | None:
        """Why the stream stopped consuming, if it did: faust's fetcher crashes on a record
        aiokafka cannot decode, and reads nothing more."""
        for service in (self.app._fetcher, self.app):
            if service.crash_reason is not None:
                return service.crash_reason
        return None

    async def stop(self) -> None:
        if self._started:
            await self.app.stop()
            self._started = False
        self._datadir.cleanup()

    async def _agent(self, stream: faust.StreamT) -> None:
        """Read records into a queue that `_handle_batches` empties a batch at a time.

        Acknowledging is manual: faust's own acknowledgement, when the agent moves past a
        record, would come before the record's batch is handled.
        """
        stream = stream.noack()
        arrived: asyncio.Queue = asyncio.Queue(maxsize=BATCH_RECORDS)
        handling = asyncio.create_task(self._handle_batches(stream, arrived),
                                       name="configs-batches")
        try:
            async for event in stream.events():
                if handling.done():
                    handling.result()  # raises what the handling crashed with
                if arrived.full():
                    await _put_unless_crashed(arrived, event, handling)
                else:
                    arrived.put_nowait(event)
        finally:
            handling.cancel()

    async def _handle_batches(self, stream: faust.StreamT, arrived: asyncio.Queue) -> None:
        while True:
            batch = [await arrived.get()]
            while len(batch) < BATCH_RECORDS and not arrived.empty():
                batch.append(arrived.get_nowait())
            await self._handle_batch([_config_record(event.message) for event in batch])
            for event in batch:
                await stream.ack(event)

    async def _handle_batch(self, records: list[ConfigRecord]) -> None:
        """Records of different configs at once; a config's second record waits for the
        first, and so for everything after it in the batch."""
        together: list[ConfigRecord] = []
        keys: set[bytes | None] = set()
        for record in records:
            if record.key in keys:
                await self._handle_together(together)
                together, keys = [], set()
            together.append(record)
            keys.add(record.key)
        await self._handle_together(together)

    async def _handle_together(self, records: list[ConfigRecord]) -> None:
        outcomes = await asyncio.gather(
            *(self._handle_record(record) for record in records), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _assigned(self, app: faust.App, assigned: set, **_: object) -> None:
        partitions = {tp.partition for tp in assigned if tp.topic == self._topic_name}
        # faust records the consumer-group generation of this assignment on the app.
        generation = int(getattr(app, "consumer_generation_id", 0) or 0)
        await self._on_assigned(partitions, generation)

    async def _revoked(self, app: faust.App, revoked: set, **_: object) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == self._topic_name}
        await self._on_revoked(partitions)

    async def _create_leader_topic(self) -> None:
        # faust's partition assignor wants a one-partition topic named after the app; with
        # topic declaration off (the product creates its own topics) it must exist already.
        name = f"{self.app.conf.id}-__assignor-__leader"
        admin = AIOKafkaAdminClient(**self._connection.client_options())
        await admin.start()
        try:
            if name not in set(await admin.list_topics()):
                replication = await replication_factor(admin)
                await admin.create_topics([NewTopic(name, 1, replication)])
        except TopicAlreadyExistsError:
            pass
        finally:
            await admin.close()


def _read_committed_records_only() -> None:
    """Make faust's consumer read committed records only; idempotent.

    faust reads committed records only under its exactly-once guarantee, which would also
    make its own commits transactional. The configs stream wants only the reading: a record
    a publisher's aborted transaction wrote is not a config change.
    """
    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "reads_committed", False):
        return

    def create_worker_consumer(thread: AIOKafkaConsumerThread, transport: object):
        consumer = create(thread, transport)
        consumer._isolation_level = "read_committed"  # read by `start`, which follows
        return consumer

    create_worker_consumer.reads_committed = True
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Where the group's reading stopped: the first record at `offset` or later in
    `partition` cannot be decoded."""

    partition: int
    offset: int
    error: str


async def find_unreadable(connection: KafkaConnection, *, topic: str, group_id: str,
                          partitions: set[int], timeout: float = 30.0) -> list[Unreadable]:
    """Read each partition from the group's committed offset (without joining the group)
    up to its end, and say where a record cannot be decoded.

    aiokafka decodes a whole record batch as it goes, so the records of the batch after
    the bad one cannot be read either: skipping must go past the batch."""
    consumer = AIOKafkaConsumer(
        **connection.client_options(), group_id=group_id, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    found = []
    try:
        for partition in sorted(partitions):
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            committed = await consumer.committed(tp)
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            offset = committed if committed is not None else (
                await consumer.beginning_offsets([tp]))[tp]
            deadline = asyncio.get_running_loop().time() + timeout
            while await consumer.position(tp) < end:
                if asyncio.get_running_loop().time() > deadline:
                    break
                try:
                    batch = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
                except Exception as error:  # the decoding error, whatever its type
                    found.append(Unreadable(partition, offset,
                                            " ".join(str(error).split())
                                            or type(error).__name__))
                    break
                for record in batch.get(tp, []):
                    offset = record.offset + 1
    finally:
        await consumer.stop()
    return found


async def _put_unless_crashed(queue: asyncio.Queue, event: object, handling: asyncio.Task) -> None:
    """Queue the event once there is room; raise what the task that empties the queue
    crashed with if it ends first."""
    put = asyncio.ensure_future(queue.put(event))
    try:
        await asyncio.wait({put, handling}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        put.cancel()
        raise
    if not put.done():
        put.cancel()
        handling.result()


def _config_record(message: object) -> ConfigRecord:
    timestamp = _record_time(message.timestamp)
    return ConfigRecord(
        key=message.key,
        value=message.value,
        partition=message.partition,
        offset=message.offset,
        timestamp=timestamp,
        headers=_headers(message.headers),
    )


def _record_time(seconds: float | None) -> dt.datetime | None:
    """The record's timestamp, or None when it has none or one no datetime can hold (any
    client may write a negative or far-future timestamp)."""
    if not seconds:
        return None
    try:
        return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _headers(raw: object) -> list[tuple[str, bytes]]:
    """Record headers as (name, bytes); a header without a value (null) becomes empty bytes."""
    if not raw:
        return []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(str(name), bytes(value) if value is not None else b"") for name, value in pairs]
