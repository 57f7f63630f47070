"""A deployment under test: topics, a publisher of config records, collectors of what the
product writes (lifecycle events, orders, DLQ records), and instances in-process or as
`reconciler run` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.lifecycle import decode_lifecycle_event
from streams.publisher import OutgoingRecord, Publisher
from streams.topics import Topics, ensure_topics
from reconciler.instance import Instance, kafka_connection
from reconciler.settings import Settings


def config_doc(
    config_id: str,
    *,
    url: str,
    enabled: bool = True,
    interval: float = 1.0,
    channel: str = "shop-1",
    product: str | None = None,
    version: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": config_id,
        "enabled": enabled,
        "channel_id": channel,
        "product_id": product or config_id,
        "interval_seconds": interval,
        "source": {"type": "http", "url": url},
    }
    if timeout is not None:
        doc["source"]["timeout_seconds"] = timeout
    if version is not None:
        doc["version"] = version
    return doc


@dataclass
class Collected:
    """Records of one topic, read from the beginning by a background consumer."""

    records: list[Any] = field(default_factory=list)


class Deployment:
    def __init__(self, *, settings: Settings, source: Any) -> None:
        self.settings = settings
        self.source = source
        self.topics = Topics(settings.topic_prefix)
        self.connection = kafka_connection(settings)
        self.publisher = Publisher(self.connection)
        self.events: list[dict] = []
        self.orders: list[Any] = []
        self.dlq: list[Any] = []
        self._consumers: list[AIOKafkaConsumer] = []
        self._tasks: list[asyncio.Task] = []
        self.instances: list[Instance] = []
        self.processes: list[subprocess.Popen] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def open(self) -> None:
        await ensure_topics(
            self.connection, self.topics, config_partitions=self.settings.config_partitions
        )
        await self.publisher.start()
        self._follow(self.topics.task_events, lambda r: r.value is None or self.events.append(
            decode_lifecycle_event(r.value)))
        self._follow(self.topics.orders, self.orders.append)
        self._follow(self.topics.dlq, self.dlq.append)
        await asyncio.sleep(0)

    async def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for instance in self.instances:
            await instance.stop()
        for closer in self._closers:
            await closer()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.stop()
        await self.publisher.stop()
        await self._delete_topics()

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await `closer` when the deployment closes, after its instances stopped."""
        self._closers.append(closer)

    async def _delete_topics(self) -> None:
        """Delete this deployment's topics, so the broker does not carry every test's
        partitions into its next restart."""
        admin = AIOKafkaAdminClient(**self.connection.client_options(),
                                    request_timeout_ms=10000)
        try:
            await asyncio.wait_for(admin.start(), 15)
            names = [name for name in await admin.list_topics()
                     if name.startswith(self.settings.topic_prefix)]
            if names:
                await asyncio.wait_for(admin.delete_topics(names), 15)
        except Exception as error:  # a test that left the broker stopped; not its concern
            print(f"could not delete the topics of {self.settings.topic_prefix}: {error!r}")
        finally:
            await admin.close()

    def _follow(self, topic: str, sink: Callable[[Any], None]) -> None:
        # As the product's users are told to read: committed records only.
        consumer = AIOKafkaConsumer(
            **self.connection.client_options(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self._consumers.append(consumer)

        async def follow() -> None:
            await consumer.start()
            partitions = consumer.partitions_for_topic(topic)
            while not partitions:
                await asyncio.sleep(0.2)
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic)
            assignment = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(assignment)
            await consumer.seek_to_beginning(*assignment)
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        sink(record)

        self._tasks.append(asyncio.create_task(follow()))

    # ---- publishing ----------------------------------------------------------------------

    def doc(self, config_id: str, **fields: Any) -> dict[str, Any]:
        return config_doc(config_id, url=fields.pop("url", self.source.url), **fields)

    async def put(self, config_id: str, **fields: Any) -> dict[str, Any]:
        doc = self.doc(config_id, **fields)
        await self.publish_raw(config_id.encode(), json.dumps(doc).encode())
        return doc

    async def delete(self, config_id: str) -> None:
        await self.publish_raw(config_id.encode(), None)

    async def publish_raw(self, key: bytes | None, value: bytes | None,
                          headers: list[tuple[str, bytes]] | None = None) -> None:
        await self.publisher.send(
            self.topics.configs, OutgoingRecord(key=key, value=value, headers=headers or [])
        )

    # ---- instances -----------------------------------------------------------------------

    async def start_instance(self, **overrides: Any) -> Instance:
        settings = self.settings.model_copy(update=overrides)
        instance = Instance(settings)
        self.instances.append(instance)
        await instance.start()
        await asyncio.wait_for(instance.joined.wait(), 60)
        return instance

    async def stop_instance(self, instance: Instance) -> None:
        self.instances.remove(instance)
        await instance.stop()

    def spawn_instance(self, *, instance_id: str, **env: str) -> subprocess.Popen:
        """`reconciler run` in its own process, for restarts and signals."""
        environment = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
            "DATABASE_URL": self.settings.database_url,
            "RECONCILER_TOPIC_PREFIX": self.settings.topic_prefix,
            "RECONCILER_CONFIG_PARTITIONS": str(self.settings.config_partitions),
            "RECONCILER_INSTANCE_ID": instance_id,
            "RECONCILER_HTTP_PORT": "0",
            **env,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "run"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path(instance_id), "ab"),
        )
        self.processes.append(process)
        return process

    def log_path(self, instance_id: str) -> str:
        return f"/tmp/{self.settings.topic_prefix}-{instance_id}.log"

    def log_tail(self, instance_id: str, *, lines: int) -> str:
        """The last lines a spawned instance logged, for a failure's report."""
        path = self.log_path(instance_id)
        with open(path, errors="replace") as log:
            tail = log.readlines()[-lines:]
        return f"---- {path}\n" + "".join(tail)

    @staticmethod
    def terminate(process: subprocess.Popen, *, timeout: float = 30) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    # ---- reading what happened -----------------------------------------------------------

    def events_of(self, config_id: str, kind: str | None = None) -> list[dict]:
        return [
            e for e in self.events
            if e["subject"] == config_id and (kind is None or e["type"] == f"pull.task.{kind}")
        ]

    def orders_of(self, config_id: str) -> list[Any]:
        return [
            r for r in self.orders if dict(r.headers).get("config-id") == config_id.encode()
        ]

    async def row(self, config_id: str) -> dict | None:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            row = await conn.fetchrow("SELECT * FROM pull_tasks WHERE config_id = $1", config_id)
        finally:
            await conn.close()
        return None if row is None else dict(row)


@contextlib.asynccontextmanager
async def deployment_with_source(settings: Settings):
    """A `Deployment` of `settings` with a sample order source of its own, both closed after."""
    from reconciler.sample_source import SampleSource

    source = SampleSource(rate=20.0)
    await source.start()
    deployment = Deployment(settings=settings, source=source)
    await deployment.open()
    try:
        yield deployment
    finally:
        await deployment.close()
        await source.stop()


async def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str,
    show: Callable[[], Any] | None = None,
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; on a timeout,
    the message includes what `show` returns."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; {show()}" if show is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{seen}")
        await asyncio.sleep(0.05)


def end_counts(events: list[dict]) -> dict[str, int]:
    """For every run with a `started` event: how many end events it has."""
    counts = {e["data"]["run_id"]: 0 for e in events if e["type"] == "pull.task.started"}
    for event in events:
        if event["type"] != "pull.task.started":
            run_id = event["data"]["run_id"]
            counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def runs_without_one_end(deployment: "Deployment") -> list[tuple]:
    """Every event of each run that has no end event or more than one, for a failure."""
    counts = end_counts(deployment.events)
    return [(e["type"].rsplit(".", 1)[1], e["data"]["reason"], e["data"]["config_id"],
             e["data"]["run_id"][:8], e["id"][:8], e["source"], e["time"], e["data"]["error"])
            for e in deployment.events if counts.get(e["data"]["run_id"]) != 1]


def active_runs(events: list[dict]) -> dict[str, str]:
    """Config id → run id of runs that started and have not ended, by the events."""
    active: dict[str, str] = {}
    ended = {e["data"]["run_id"] for e in events if e["type"] != "pull.task.started"}
    for event in events:
        if event["type"] == "pull.task.started" and event["data"]["run_id"] not in ended:
            active[event["subject"]] = event["data"]["run_id"]
    return active


async def rows(database_url: str) -> dict[str, dict]:
    conn = await asyncpg.connect(database_url)
    try:
        found = await conn.fetch(
            "SELECT *, EXTRACT(EPOCH FROM (lease_expires_at - now()))::float8 AS lease_left"
            " FROM pull_tasks"
        )
    except asyncpg.UndefinedTableError:
        return {}  # no instance has created the schema yet
    finally:
        await conn.close()
    return {r["config_id"]: dict(r) for r in found}
