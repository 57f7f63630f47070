"""`reconciler demo`: the product's main job on sample input, from start to a checked end.

The demo brings up what it needs (the local stack, unless Kafka or PostgreSQL was pointed
elsewhere), starts the sample order source and one instance in this process, and publishes
a dozen configs: four channels times three products, each pulled every one to two seconds.
Once every config runs, it changes them the way other services would, one step at a time,
and waits for each effect to show on `<p>.task-events` or in `pull_tasks`:

1. disable a config and enable it again: its run stops (`disabled`) and a new run starts;
2. change another config's interval: its run stops (`reconfigured`) and a new one starts;
3. delete a third with a tombstone: its run stops (`deleted`) and its row says `deleted`;
4. send an invalid record for a fourth: it lands in the DLQ and the running run is untouched.

It ends with a summary read back from the database and from the topics themselves (the
running-task table, lifecycle events by type, orders per config, the DLQ) and checks the
final state against what the contract promises, printing PASS or FAIL with the reasons.

Each demo run is a deployment of its own: a fresh topic prefix `demo-<hex>` and, in the
same database, a schema of the same name selected through the connection's `search_path`.
A schema rather than only distinct config ids, because an instance reconciles every row of
the partitions it is assigned whatever topic the row came from, so rows left by an earlier
demo (or by a deployment on the default prefix) would be started again by this one. The
schema and the topics are removed at the end; the local stack keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table

from streams.configs import Config, config_from_json_dict
from streams.connection import KafkaConnection
from streams.lifecycle import EVENT_FAILED, EVENT_STARTED, EVENT_STOPPED, decode_lifecycle_event
from streams.publisher import OutgoingRecord, Publisher
from streams.topics import Topics
from streams.tracing import headers_with_context, producer_span
from reconciler.instance import Instance, kafka_connection
from reconciler.sample_source import SampleSource
from reconciler.settings import Settings

CHANNELS = ("shop-1", "shop-2", "shop-3", "shop-4")
PRODUCTS = ("sku-1", "sku-2", "sku-3")
INTERVALS = (1.0, 1.5, 2.0)
SOURCE_RATE = 5.0  # orders per second per channel and product

JOIN_TIMEOUT_SECONDS = 30.0
STEP_TIMEOUT_SECONDS = 15.0
READ_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.1
# How long the loops run undisturbed after the last step, before the summary.
SETTLE_SECONDS = 4.0


# ---- reading topics ------------------------------------------------------------------------


class TopicTail:
    """Reads one topic from its beginning in the background and keeps what it decoded.

    `decode` turns a record into the item kept; a record it refuses (ValueError) is
    counted in `undecodable` and skipped.
    """

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        *,
        decode: Callable[[ConsumerRecord], Any] = lambda record: record,
    ) -> None:
        self.topic = topic
        self.items: list[Any] = []
        self.undecodable = 0
        self._decode = decode
        self._consumer = AIOKafkaConsumer(
            topic,
            group_id=None,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            enable_auto_commit=False,
            **connection.client_options(),
        )
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read_forever(), name=f"tail:{self.topic}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def wait_for(self, matches: Callable[[Any], bool], *, timeout: float) -> Any | None:
        """The first item kept, past or future, that `matches`; None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((item for item in self.items if matches(item)), None)
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(POLL_SECONDS)

    async def _read_forever(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        self.items.append(self._decode(record))
                    except ValueError:
                        self.undecodable += 1


async def read_to_end(
    connection: KafkaConnection, topic: str, *, partitions: Iterable[int]
) -> list[ConsumerRecord]:
    """Every record of `topic` from its beginning up to the end it has now."""
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, isolation_level="read_committed",
        **connection.client_options()
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, number) for number in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        records: list[ConsumerRecord] = []
        async with asyncio.timeout(READ_TIMEOUT_SECONDS):
            while await _behind(consumer, ends):
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def _behind(consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int]) -> bool:
    for partition, end in ends.items():
        if await consumer.position(partition) < end:
            return True
    return False


def decode_event(record: ConsumerRecord) -> dict:
    return decode_lifecycle_event(record.value)


def header(record: ConsumerRecord, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return value.decode("utf-8", "replace")
    return None


# ---- what the demo runs on -----------------------------------------------------------------


@dataclass
class Demo:
    """What the steps share: the running parts and the desired state published so far."""

    settings: Settings
    console: Console
    source: SampleSource
    instance: Instance
    publisher: Publisher
    events: TopicTail
    dlq: TopicTail
    configs: dict[str, Config] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)

    @property
    def running_ids(self) -> list[str]:
        return [config_id for config_id in self.configs if config_id not in self.deleted]


class DemoError(Exception):
    """The demo could not get going; the message names what could not be reached."""


async def run_demo(settings: Settings, *, console: Console) -> bool:
    """Run the whole demo; True when the final state is what the contract promises."""
    began = time.monotonic()
    local_stack = settings.uses_local_stack
    settings = await stack_settings(settings, console=console)
    prefix = f"demo-{secrets.token_hex(3)}"
    console.print(f"demo deployment [bold]{prefix}[/]: topics {prefix}.*, database schema "
                  f"{schema_name(prefix)}")

    async with contextlib.AsyncExitStack() as stack:
        database_url = await stack.enter_async_context(
            scratch_schema(settings.database_url, name=schema_name(prefix), console=console)
        )
        settings = settings.model_copy(
            update={
                "topic_prefix": prefix,
                "group_id_setting": None,
                "http_port": 0,
                "database_url": database_url,
            }
        )
        stack.push_async_callback(delete_topics, settings, console=console)
        demo = await start_parts(settings, console=console, stack=stack)
        passed = await play(demo)

    console.print(f"demo took {time.monotonic() - began:.1f} s")
    if local_stack:
        console.print("the local stack keeps running; [bold]make down[/] (or "
                      "[bold].venv/bin/reconciler dev down[/]) stops it")
    return passed


# ---- setting up ----------------------------------------------------------------------------


async def stack_settings(settings: Settings, *, console: Console) -> Settings:
    """Settings pointing at the local stack, brought up first, unless they point elsewhere."""
    if not settings.uses_local_stack:
        console.print(f"using Kafka at {settings.kafka_bootstrap_servers} and the database "
                      "of DATABASE_URL (the local stack is left alone)")
        return settings

    from reconciler.localstack import default_stack

    console.print("bringing up the local stack (Kafka and PostgreSQL on 127.0.0.1)")
    endpoints = await asyncio.to_thread(
        default_stack().up, progress=lambda line: console.print(f"  {line}")
    )
    return settings.model_copy(
        update={
            "kafka_bootstrap_servers": endpoints.kafka_bootstrap_servers,
            "database_url": endpoints.database_url,
        }
    )


def schema_name(prefix: str) -> str:
    return prefix.replace("-", "_").replace(".", "_")


def with_search_path(database_url: str, schema: str) -> str:
    """The DSN with `search_path` set to `schema` alone (asyncpg passes it to the server)."""
    parts = urlsplit(database_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


@contextlib.asynccontextmanager
async def scratch_schema(database_url: str, *, name: str, console: Console) -> AsyncIterator[str]:
    """A schema of its own for one demo run, dropped afterwards; yields the DSN selecting it.

    Where the role may not create schemas, the demo runs in the database as it is and says so.
    """
    connection = await connect_database(database_url)
    try:
        await connection.execute(f'CREATE SCHEMA "{name}"')
        created = True
    except asyncpg.InsufficientPrivilegeError:
        created = False
    finally:
        await connection.close()

    if not created:
        console.print(f"[yellow]![/] may not create schema {name}; the demo's rows go to the "
                      "database's own tables")
        yield database_url
        return
    try:
        yield with_search_path(database_url, name)
    finally:
        await drop_schema(database_url, name=name, console=console)


async def connect_database(database_url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(database_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        where = urlsplit(database_url)
        raise DemoError(
            f"could not reach PostgreSQL at {where.hostname}:{where.port or 5432}: "
            f"{' '.join(str(error).split()) or type(error).__name__}"
        ) from error


async def drop_schema(database_url: str, *, name: str, console: Console) -> None:
    try:
        connection = await connect_database(database_url)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await connection.close()
        console.print(f"removed the demo's database schema {name}")
    except (DemoError, asyncpg.PostgresError) as error:
        console.print(f"[yellow]![/] could not drop schema {name}: {error}")


async def delete_topics(settings: Settings, *, console: Console) -> None:
    """Delete every topic of the demo's prefix, faust's assignor topic included."""
    admin = AIOKafkaAdminClient(**kafka_connection(settings).client_options())
    try:
        await admin.start()
        names = [t for t in await admin.list_topics()
                 if t.startswith(f"{settings.topic_prefix}.")]
        if names:
            await admin.delete_topics(names)
        console.print(f"removed the demo's {len(names)} topics")
    except Exception as error:  # cleaning up must not hide the demo's verdict
        console.print(f"[yellow]![/] could not delete the demo's topics: {error}")
    finally:
        await admin.close()


async def start_parts(
    settings: Settings, *, console: Console, stack: contextlib.AsyncExitStack
) -> Demo:
    """Start the source, the instance, the publisher and the topic tails, in that order.

    Each part's stop goes on `stack` as soon as the part exists, so whatever fails later,
    what was started is stopped, in reverse order: the instance before the source it pulls.
    """
    source = SampleSource(host="127.0.0.1", port=0, rate=SOURCE_RATE)
    await source.start()
    stack.push_async_callback(source.stop)
    console.print(f"sample order source listening on {source.url}")

    instance = Instance(settings)
    stack.push_async_callback(stop_instance, instance, console=console)
    await start_instance(instance, console=console)

    connection = kafka_connection(settings)
    publisher = Publisher(connection)
    await publisher.start()
    stack.push_async_callback(publisher.stop)

    topics = Topics(settings.topic_prefix)
    events = TopicTail(connection, topics.task_events, decode=decode_event)
    dlq = TopicTail(connection, topics.dlq)
    for tail in (events, dlq):
        await tail.start()
        stack.push_async_callback(tail.stop)

    return Demo(settings=settings, console=console, source=source, instance=instance,
                publisher=publisher, events=events, dlq=dlq)


async def start_instance(instance: Instance, *, console: Console) -> None:
    with console.status(f"starting instance {instance.instance_id} and joining its group"):
        began = time.monotonic()
        try:
            await instance.start()
        except Exception as error:
            raise DemoError(f"the instance could not start: {error}") from error
        try:
            await asyncio.wait_for(instance.joined.wait(), JOIN_TIMEOUT_SECONDS)
        except TimeoutError:
            raise DemoError(
                f"the instance did not join consumer group {instance.settings.group_id} "
                f"within {JOIN_TIMEOUT_SECONDS:g} s"
            ) from None
    console.print(f"instance {instance.instance_id} joined its group in "
                  f"{time.monotonic() - began:.1f} s")


async def stop_instance(instance: Instance, *, console: Console) -> None:
    with console.status("stopping the instance (its runs end with reason shutdown)"):
        await instance.stop()
    console.print("instance stopped")


# ---- the script ----------------------------------------------------------------------------


async def play(demo: Demo) -> bool:
    await publish_sample_configs(demo)
    if await wait_until_all_running(demo):
        ids = list(demo.configs)
        # One config per step, each from another channel, so no step disturbs the next.
        await reenable(demo, ids[0])
        await change_interval(demo, ids[3])
        await delete_config(demo, ids[6])
        await send_invalid_record(demo, ids[9])
        await let_loops_pull(demo)

    state = await read_final_state(demo)
    print_summary(demo, state)
    return print_verdict(demo.console, problems_of(demo, state))


def sample_configs(prefix: str, url: str) -> list[Config]:
    configs = []
    for channel in CHANNELS:
        for number, product in enumerate(PRODUCTS):
            configs.append(config_from_json_dict({
                "id": f"{prefix}.{channel}.{product}",
                "enabled": True,
                "channel_id": channel,
                "product_id": product,
                "interval_seconds": INTERVALS[number % len(INTERVALS)],
                "source": {"type": "http", "url": url, "timeout_seconds": 5},
                "version": 1,
            }))
    return configs


async def publish_sample_configs(demo: Demo) -> None:
    configs = sample_configs(demo.settings.topic_prefix, demo.source.url)
    for config in configs:
        await publish(demo, config)
    demo.console.print(f"published {len(configs)} configs ({len(CHANNELS)} channels × "
                       f"{len(PRODUCTS)} products, every {INTERVALS[0]:g}–{INTERVALS[-1]:g} s)")


async def wait_until_all_running(demo: Demo) -> bool:
    began = time.monotonic()
    with demo.console.status("waiting for every config to run"):
        while time.monotonic() - began < STEP_TIMEOUT_SECONDS:
            states = await config_states(demo)
            waiting = [c for c in demo.configs if states.get(c) != "running"]
            if not waiting:
                ok(demo, f"all {len(demo.configs)} configs running after "
                         f"{time.monotonic() - began:.1f} s")
                return True
            await asyncio.sleep(POLL_SECONDS)
    described = ", ".join(f"{c} ({states.get(c, 'no row')})" for c in waiting)
    fail(demo, f"{len(waiting)} configs not running after {STEP_TIMEOUT_SECONDS:g} s: "
               f"{described}")
    return False


async def config_states(demo: Demo) -> dict[str, str]:
    return {row["config_id"]: row["state"] for row in await demo.instance.store.status_rows()}


async def reenable(demo: Demo, config_id: str) -> None:
    """Disable the config, then enable it: the old run stops, a new run starts."""
    step(demo, 1, f"disable {config_id}, then enable it again")
    old_run = await recorded_run(demo, config_id)
    await publish(demo, bumped(demo.configs[config_id], enabled=False))
    await expect_event(demo, stopped(config_id, old_run, "disabled"),
                       describe=lambda e: f"run {short(e)} stopped (disabled)")
    saved_cursor = await recorded_cursor(demo, config_id)
    runs_before = known_runs(demo, config_id)
    await publish(demo, bumped(demo.configs[config_id], enabled=True))
    event = await expect_event(demo, started(config_id, besides=runs_before),
                               describe=lambda e: f"new run {short(e)} started")
    if event is not None:
        await expect_resumed(demo, config_id, run_id=event["data"]["run_id"], cursor=saved_cursor)


async def expect_resumed(demo: Demo, config_id: str, *, run_id: str, cursor: str | None) -> None:
    """The run's first request to the source asks from the cursor saved before it."""
    began = time.monotonic()
    while time.monotonic() - began < STEP_TIMEOUT_SECONDS:
        requests = [r for r in demo.source.requests_for(config_id) if r.run_id == run_id]
        if requests:
            asked = requests[0].cursor
            if asked == cursor:
                ok(demo, f"its first pull resumed from the saved cursor {cursor}"
                   if cursor is not None else "its first pull started from the beginning "
                   "(the old run had saved no cursor yet)")
            else:
                fail(demo, f"the new run of {config_id} asked from cursor {asked}, "
                           f"not from the saved cursor {cursor}")
            return
        await asyncio.sleep(POLL_SECONDS)
    fail(demo, f"the new run of {config_id} did not pull within {STEP_TIMEOUT_SECONDS:g} s")


async def change_interval(demo: Demo, config_id: str) -> None:
    config = demo.configs[config_id]
    interval = 2.0 if config.interval_seconds != 2.0 else 1.0
    step(demo, 2, f"change the interval of {config_id} from "
                  f"{config.interval_seconds:g} s to {interval:g} s")
    old_run = await recorded_run(demo, config_id)
    # Taken before the change: the new run may start before the old one's end is seen.
    runs_before = known_runs(demo, config_id)
    await publish(demo, bumped(config, interval_seconds=interval))
    await expect_event(demo, stopped(config_id, old_run, "reconfigured"),
                       describe=lambda e: f"run {short(e)} stopped (reconfigured)")
    await expect_event(demo, started(config_id, besides=runs_before),
                       describe=lambda e: f"new run {short(e)} started with the new interval")


async def delete_config(demo: Demo, config_id: str) -> None:
    step(demo, 3, f"delete {config_id} (a tombstone)")
    old_run = await recorded_run(demo, config_id)
    await send_config_record(demo, config_id, None)
    demo.deleted.add(config_id)
    await expect_event(demo, stopped(config_id, old_run, "deleted"),
                       describe=lambda e: f"run {short(e)} stopped (deleted)")
    began = time.monotonic()
    while time.monotonic() - began < STEP_TIMEOUT_SECONDS:
        row = await demo.instance.store.read(config_id)
        if row is not None and row.state == "deleted":
            ok(demo, "its row in pull_tasks says deleted")
            return
        await asyncio.sleep(POLL_SECONDS)
    fail(demo, f"the row of {config_id} does not say deleted after {STEP_TIMEOUT_SECONDS:g} s")


async def send_invalid_record(demo: Demo, config_id: str) -> None:
    step(demo, 4, f'send an invalid record for {config_id} (interval_seconds "5", a string)')
    old_run = await recorded_run(demo, config_id)
    document = bumped_document(demo.configs[config_id], interval_seconds="5")
    key = config_id.encode()
    await send_config_record(demo, config_id, json.dumps(document).encode())
    record = await demo.dlq.wait_for(lambda r: r.key == key, timeout=STEP_TIMEOUT_SECONDS)
    if record is None:
        fail(demo, f"no DLQ record for {config_id} within {STEP_TIMEOUT_SECONDS:g} s")
        return
    ok(demo, f"sent to {demo.topics.dlq}: {header(record, 'error')}")
    now_run = await recorded_run(demo, config_id)
    if now_run == old_run:
        ok(demo, f"run {old_run[:8] if old_run else '-'} keeps running")
    else:
        fail(demo, f"the invalid record changed the run of {config_id} "
                   f"({old_run} became {now_run})")


async def let_loops_pull(demo: Demo) -> None:
    """Leave the loops alone for a few intervals, so the summary shows them at work."""
    with demo.console.status(f"letting the loops pull for {SETTLE_SECONDS:g} s"):
        await asyncio.sleep(SETTLE_SECONDS)


# ---- step helpers --------------------------------------------------------------------------


async def publish(demo: Demo, config: Config) -> None:
    await send_config_record(demo, config.id, config.to_json_bytes())
    demo.configs[config.id] = config


async def send_config_record(demo: Demo, config_id: str, value: bytes | None) -> None:
    """Publish as `reconciler config put` does: in a `send` span whose context travels in
    the record's `traceparent`, so the change's trace starts here."""
    with producer_span("send", demo.topics.configs, key=config_id,
                       attributes={"config_id": config_id}):
        await demo.publisher.send(
            demo.topics.configs,
            OutgoingRecord(key=config_id.encode(), value=value, headers=headers_with_context()),
        )


def bumped(config: Config, **changes: Any) -> Config:
    """The config changed as another service would publish it: whole, one version up."""
    return config.with_changes(version=(config.version or 0) + 1, **changes)


def bumped_document(config: Config, **changes: Any) -> dict:
    """Like `bumped`, as a plain document that may break the rules."""
    document = config.to_json_dict()
    document.update(changes, version=(config.version or 0) + 1)
    return document


async def recorded_run(demo: Demo, config_id: str) -> str | None:
    row = await demo.instance.store.read(config_id)
    return None if row is None else row.run_id


async def recorded_cursor(demo: Demo, config_id: str) -> str | None:
    row = await demo.instance.store.read(config_id)
    return None if row is None else row.cursor


def known_runs(demo: Demo, config_id: str) -> set[str]:
    return {
        event["data"]["run_id"]
        for event in demo.events.items
        if event["type"] == EVENT_STARTED and event["subject"] == config_id
    }


def stopped(config_id: str, run_id: str | None, reason: str) -> Callable[[dict], bool]:
    def matches(event: dict) -> bool:
        data = event["data"]
        return (event["type"] == EVENT_STOPPED and event["subject"] == config_id
                and data["run_id"] == run_id and data["reason"] == reason)
    return matches


def started(config_id: str, *, besides: set[str]) -> Callable[[dict], bool]:
    def matches(event: dict) -> bool:
        return (event["type"] == EVENT_STARTED and event["subject"] == config_id
                and event["data"]["run_id"] not in besides)
    return matches


async def expect_event(
    demo: Demo, matches: Callable[[dict], bool], *, describe: Callable[[dict], str]
) -> dict | None:
    began = time.monotonic()
    event = await demo.events.wait_for(matches, timeout=STEP_TIMEOUT_SECONDS)
    if event is None:
        fail(demo, f"the expected event did not arrive within {STEP_TIMEOUT_SECONDS:g} s")
    else:
        ok(demo, f"{describe(event)}, seen after {time.monotonic() - began:.1f} s")
    return event


def short(event: dict) -> str:
    return event["data"]["run_id"][:8]


def step(demo: Demo, number: int, text: str) -> None:
    demo.console.print(f"[bold]step {number}[/]: {text}")


def ok(demo: Demo, text: str) -> None:
    demo.console.print(f"  [green]✓[/] {text}")


def fail(demo: Demo, text: str) -> None:
    demo.problems.append(text)
    demo.console.print(f"  [red]✗[/] {text}")


# ---- summary and verdict -------------------------------------------------------------------


@dataclass
class FinalState:
    """What the demo ends with, read back from the table and from the topics themselves."""

    rows: dict[str, Mapping[str, Any]]
    events: list[dict]
    undecodable_events: int
    orders: Counter
    dlq_records: int


async def read_final_state(demo: Demo) -> FinalState:
    connection = kafka_connection(demo.settings)
    topics = demo.topics
    with demo.console.status("reading the running-task table and the topics"):
        rows = {row["config_id"]: row for row in await demo.instance.store.status_rows()}
        event_records, order_records, dlq_records = [
            await read_to_end(
                connection, topic, partitions=await demo.publisher.partitions_for(topic)
            )
            for topic in (topics.task_events, topics.orders, topics.dlq)
        ]
    events, undecodable = decode_all(event_records)
    return FinalState(
        rows=rows,
        events=events,
        undecodable_events=undecodable,
        orders=Counter(header(record, "config-id") for record in order_records),
        dlq_records=len(dlq_records),
    )


def print_summary(demo: Demo, state: FinalState) -> None:
    console = demo.console
    prefix = f"{demo.settings.topic_prefix}."
    ids = list(demo.configs)
    console.print(f"config ids below are shown without their prefix {prefix}")
    console.print(task_table(state.rows, ids, prefix=prefix))
    console.print(event_table(state.events))
    console.print(order_table(state.orders, ids, prefix=prefix))
    console.print(f"DLQ {demo.topics.dlq}: {state.dlq_records} record(s)")


def problems_of(demo: Demo, state: FinalState) -> list[str]:
    problems = demo.problems + find_problems(
        running=demo.running_ids,
        deleted=demo.deleted,
        rows=state.rows,
        events=state.events,
        orders=state.orders,
        dlq_count=state.dlq_records,
        overlaps=demo.source.overlaps(),
    )
    if state.undecodable_events:
        problems.append(f"{state.undecodable_events} record(s) on {demo.topics.task_events} "
                        "are not lifecycle events")
    return problems


def decode_all(records: Iterable[ConsumerRecord]) -> tuple[list[dict], int]:
    events, undecodable = [], 0
    for record in records:
        try:
            events.append(decode_event(record))
        except ValueError:
            undecodable += 1
    return events, undecodable


def task_table(rows: Mapping[str, Mapping[str, Any]], ids: list[str], *, prefix: str) -> Table:
    table = Table(title="running-task table (pull_tasks)")
    for column in ("config", "state", "run", "fence", "owner", "last pull", "cursor"):
        table.add_column(column)
    now = dt.datetime.now(dt.timezone.utc)
    for config_id in ids:
        row = rows.get(config_id)
        if row is None:
            table.add_row(config_id.removeprefix(prefix), "[red]no row[/]", "", "", "", "", "")
            continue
        last_pull = row["last_pull_at"]
        table.add_row(
            config_id.removeprefix(prefix),
            row["state"],
            (row["run_id"] or "-")[:8],
            str(row["fence"]),
            row["owner"] or "-",
            f"{(now - last_pull).total_seconds():.1f} s ago" if last_pull else "never",
            row["cursor"] or "-",
        )
    return table


def event_table(events: list[dict]) -> Table:
    table = Table(title="lifecycle events")
    table.add_column("type")
    table.add_column("count", justify="right")
    table.add_column("reasons")
    for event_type in (EVENT_STARTED, EVENT_STOPPED, EVENT_FAILED):
        of_type = [e for e in events if e["type"] == event_type]
        reasons = Counter(e["data"]["reason"] for e in of_type if e["data"]["reason"])
        table.add_row(event_type, str(len(of_type)),
                      ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
    return table


def order_table(orders: Mapping[str | None, int], ids: list[str], *, prefix: str) -> Table:
    table = Table(title="orders per config")
    table.add_column("config")
    table.add_column("orders", justify="right")
    for config_id in ids:
        table.add_row(config_id.removeprefix(prefix), str(orders.get(config_id, 0)))
    return table


@dataclass
class RunHistory:
    config_id: str
    starts: int = 0
    ends: int = 0


def run_histories(events: Iterable[dict]) -> dict[str, RunHistory]:
    runs: dict[str, RunHistory] = {}
    for event in events:
        data = event["data"]
        history = runs.setdefault(data["run_id"], RunHistory(config_id=data["config_id"]))
        if event["type"] == EVENT_STARTED:
            history.starts += 1
        else:
            history.ends += 1
    return runs


def find_problems(
    *,
    running: Iterable[str],
    deleted: Iterable[str],
    rows: Mapping[str, Mapping[str, Any]],
    events: list[dict],
    orders: Mapping[str | None, int],
    dlq_count: int,
    overlaps: list[tuple[str, str, str]],
) -> list[str]:
    """What is wrong with the final state; empty when it is what the contract promises."""
    runs = run_histories(events)
    active = active_runs(runs)
    problems = []
    problems += problems_of_running(running, rows=rows, active=active)
    problems += problems_of_deleted(deleted, rows=rows, active=active)
    problems += problems_of_ended_runs(runs)
    if dlq_count < 1:
        problems.append("the DLQ is empty; the invalid record did not reach it")
    for config_id in sorted({h.config_id for h in runs.values() if h.starts}):
        if not orders.get(config_id):
            problems.append(f"{config_id} ran but no orders of it reached the orders topic")
    for config_id, run_a, run_b in overlaps:
        problems.append(f"runs {run_a} and {run_b} of {config_id} overlapped at the source")
    return problems


def active_runs(runs: Mapping[str, RunHistory]) -> dict[str, list[str]]:
    """Run ids with a `started` event and no end event, by config id."""
    active: dict[str, list[str]] = {}
    for run_id, history in runs.items():
        if history.starts and not history.ends:
            active.setdefault(history.config_id, []).append(run_id)
    return active


def problems_of_running(
    config_ids: Iterable[str],
    *,
    rows: Mapping[str, Mapping[str, Any]],
    active: Mapping[str, list[str]],
) -> list[str]:
    problems = []
    for config_id in config_ids:
        row = rows.get(config_id)
        live = active.get(config_id, [])
        if row is None or row["state"] != "running":
            problems.append(f"{config_id} is {row['state'] if row else 'missing'}, "
                            "expected running")
        if len(live) != 1:
            problems.append(f"{config_id} has {len(live)} active runs by the events, expected 1")
        elif row is not None and row["run_id"] != live[0]:
            problems.append(f"{config_id}: the row names run {row['run_id']}, "
                            f"the events run {live[0]}")
    return problems


def problems_of_deleted(
    config_ids: Iterable[str],
    *,
    rows: Mapping[str, Mapping[str, Any]],
    active: Mapping[str, list[str]],
) -> list[str]:
    problems = []
    for config_id in config_ids:
        row = rows.get(config_id)
        if row is None or row["state"] != "deleted":
            problems.append(f"{config_id} is {row['state'] if row else 'missing'}, "
                            "expected deleted")
        if active.get(config_id):
            problems.append(f"deleted {config_id} still has an active run")
    return problems


def problems_of_ended_runs(runs: Mapping[str, RunHistory]) -> list[str]:
    """Every run that ended must have started, and ended exactly once."""
    problems = []
    for run_id, history in sorted(runs.items()):
        if history.ends > 1:
            problems.append(f"run {run_id} of {history.config_id} has {history.ends} end events")
        if history.ends and not history.starts:
            problems.append(f"run {run_id} of {history.config_id} ended without starting")
    return problems


def print_verdict(console: Console, problems: list[str]) -> bool:
    if not problems:
        console.print("[bold green]PASS[/]: every config but the deleted one runs exactly once, "
                      "the deleted one is deleted, the invalid record is in the DLQ, every "
                      "run that ended did so once and every config that ran pulled orders")
        return True
    console.print(f"[bold red]FAIL[/]: {len(problems)} problem(s)")
    for problem in problems:
        console.print(f"  - {problem}")
    return False
