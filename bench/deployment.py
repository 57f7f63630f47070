"""One deployment of a phase: its topics and database, a sample order source, the system
under test (the product or the scanner) and the observer of its events.

The product takes changes as config records on `<p>.configs`; the scanner reads them from
its table, so a change reaches it as a committed row (no broker on the way, which only
favours the scanner). Either way `apply` returns once the change is durable, and the time
taken just before it is where a reaction is measured from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.publisher import OutgoingRecord, Publisher
from streams.topics import Topics, ensure_topics
from bench import processes, scanner
from bench.observe import Observer
from bench.stack import (BenchStack, Endpoints, connection_for, create_database,
                         delete_topics, drop_database)

log = logging.getLogger(__name__)

CONFIG_PARTITIONS = 12
READY_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class Change:
    """The whole desired state of one config after a change, as its owner publishes it."""

    config_id: str
    enabled: bool
    interval: float
    version: int


class Context:
    """What every phase shares: the servers, where logs go, the run's label."""

    def __init__(self, *, stack: BenchStack, endpoints: Endpoints, logs: Path,
                 label: str, instance_settings: dict[str, str] | None = None) -> None:
        self.stack = stack
        # Variables every product instance of the run gets (`--instance-setting`).
        self.instance_settings = instance_settings or {}
        self.endpoints = endpoints
        self.logs = logs
        self.label = label
        self.connection = connection_for(endpoints)


class Deployment:
    def __init__(self, context: Context, name: str, *, source_rate: float) -> None:
        self.context = context
        self.name = name
        self.prefix = f"bench-{context.label}-{name}-{uuid.uuid4().hex[:6]}"
        self.topics = Topics(self.prefix)
        self.source_rate = source_rate
        self.database_url = ""
        self.source: processes.Spawned | None = None
        self.source_url = ""
        self.control_url = ""
        self.publisher = Publisher(context.connection)
        self.observer: Observer | None = None

    async def open(self, *, events_topic: str) -> None:
        context = self.context
        self.database_url = await create_database(context.endpoints, self.name)
        await ensure_topics(context.connection, self.topics,
                            config_partitions=CONFIG_PARTITIONS)
        await self._create_scanner_topics()
        await self.publisher.start()
        port, control = processes.free_port(), processes.free_port()
        self.source = processes.spawn_source(
            name=f"{self.name}-source", port=port, control_port=control,
            rate=self.source_rate, logs=context.logs,
        )
        self.source_url = f"http://127.0.0.1:{port}/orders"
        self.control_url = f"http://127.0.0.1:{control}"
        await processes.wait_http_ok(f"{self.control_url}/stats", timeout=30,
                                     process=self.source)
        self.observer = Observer(context.connection, events_topic)
        await self.observer.start()

    async def _create_scanner_topics(self) -> None:
        admin = AIOKafkaAdminClient(**self.context.connection.client_options())
        await admin.start()
        try:
            await admin.create_topics([
                NewTopic(f"{self.prefix}.scanner-events", CONFIG_PARTITIONS, 1),
                NewTopic(f"{self.prefix}.scanner-orders", CONFIG_PARTITIONS, 1),
            ])
        finally:
            await admin.close()

    async def close(self) -> None:
        if self.observer is not None:
            await self.observer.stop()
        if self.source is not None:
            await self.source.stop(timeout=15)
        await self.publisher.stop()
        await delete_topics(self.context.connection, self.prefix)
        if self.database_url:
            await drop_database(self.context.endpoints, self.database_url)

    async def source_stats(self) -> dict:
        return await processes.get_json(f"{self.control_url}/stats")

    async def overlaps(self) -> dict:
        return await processes.get_json(f"{self.control_url}/overlaps", timeout=600)

    def config_doc(self, change: Change) -> dict:
        return {
            "id": change.config_id,
            "enabled": change.enabled,
            "channel_id": "bench",
            "product_id": change.config_id,
            "interval_seconds": change.interval,
            "source": {"type": "http", "url": self.source_url},
            "version": change.version,
        }


class ProductSystem:
    """`reconciler run`, one instance, fed through the configs topic."""

    name = "product"

    def __init__(self, deployment: Deployment, *, settings: dict[str, str] | None = None):
        self.deployment = deployment
        self.settings = settings or {}
        self.process: processes.Spawned | None = None
        self.http_port = 0

    @property
    def events_topic(self) -> str:
        return self.deployment.topics.task_events

    async def start(self) -> None:
        deployment = self.deployment
        self.http_port = processes.free_port()
        self.process = processes.spawn_instance(
            name=f"{deployment.name}-instance", kafka=deployment.context.endpoints
            .kafka_bootstrap_servers, database_url=deployment.database_url,
            prefix=deployment.prefix, http_port=self.http_port, logs=deployment.context.logs,
            settings={**deployment.context.instance_settings, **self.settings},
        )
        await processes.wait_http_ok(f"http://127.0.0.1:{self.http_port}/readyz",
                                     timeout=READY_SECONDS, process=self.process)

    async def apply(self, changes: list[Change]) -> None:
        deployment = self.deployment
        records = [
            OutgoingRecord(key=c.config_id.encode(),
                           value=json.dumps(deployment.config_doc(c)).encode(), headers=[])
            for c in changes
        ]
        await deployment.publisher.send_all(deployment.topics.configs, records)

    async def metrics(self) -> dict[str, float]:
        """The instance's Prometheus counters and gauges, summed over their labels."""
        text = await processes.get_text(f"http://127.0.0.1:{self.http_port}/metrics")
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            try:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
        return totals

    async def stop(self, *, timeout: float = 60.0) -> float | None:
        return None if self.process is None else await self.process.stop(timeout=timeout)


class ScannerSystem:
    """The timer-and-scan comparator (`bench.scanner`), fed through its table."""

    def __init__(self, deployment: Deployment, *, variant: str, scan_seconds: float) -> None:
        self.deployment = deployment
        self.variant = variant
        self.name = f"scanner-{variant}"
        self.scan_seconds = scan_seconds
        self.process: processes.Spawned | None = None
        self._pool: asyncpg.Pool | None = None
        self._stats_path = deployment.context.logs / f"{deployment.name}-{self.name}.json"

    @property
    def events_topic(self) -> str:
        return f"{self.deployment.prefix}.scanner-events"

    async def start(self) -> None:
        deployment = self.deployment
        self._pool = await asyncpg.create_pool(deployment.database_url, min_size=1,
                                               max_size=2)
        async with self._pool.acquire() as conn:
            await scanner.ensure_schema(conn)
        self.process = processes.spawn_scanner(
            name=f"{deployment.name}-{self.name}", variant=self.variant,
            kafka=deployment.context.endpoints.kafka_bootstrap_servers,
            database_url=deployment.database_url, prefix=deployment.prefix,
            scan_seconds=self.scan_seconds, stats_path=self._stats_path,
            logs=deployment.context.logs,
        )

    async def apply(self, changes: list[Change]) -> None:
        assert self._pool is not None
        url = self.deployment.source_url
        await self._pool.executemany(
            """
            INSERT INTO scanner_configs (config_id, enabled, channel_id, product_id,
                                         interval_seconds, url, version)
            VALUES ($1, $2, 'bench', $1, $3, $4, $5)
            ON CONFLICT (config_id) DO UPDATE SET enabled = excluded.enabled,
                interval_seconds = excluded.interval_seconds, url = excluded.url,
                version = excluded.version, updated_at = now()
            """,
            [(c.config_id, c.enabled, c.interval, url, c.version) for c in changes],
        )

    async def stop(self, *, timeout: float = 60.0) -> float | None:
        took = None if self.process is None else await self.process.stop(timeout=timeout)
        if self._pool is not None:
            await self._pool.close()
        return took

    def stats(self) -> dict:
        try:
            return json.loads(self._stats_path.read_text())
        except (OSError, ValueError):
            return {}


async def wait_until(predicate, *, timeout: float, poll: float = 0.1) -> bool:
    """Poll a plain function until it is true; False on a timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll)
    return True
