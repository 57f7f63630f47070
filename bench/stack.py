"""The benchmark's own Kafka and PostgreSQL, and the deployments made on them.

The stack is `reconciler.localstack.LocalStack` on ports of its own (Kafka 49192, its
controller 49193, PostgreSQL 55532) in `.stack-bench/`, so a benchmark never shares a broker
or a database with a test session or a developer's stack. With `--kafka-bootstrap` and
`--database-url` the benchmark runs on servers someone else started and stops nothing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from aiokafka.admin import AIOKafkaAdminClient

from reconciler.localstack import LocalStack, project_root
from streams.connection import KafkaConnection

log = logging.getLogger(__name__)

KAFKA_PORT = 49192
CONTROLLER_PORT = 49193
POSTGRES_PORT = 55532
STACK_FOLDER = ".stack-bench"


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap_servers: str
    # A database the benchmark may create other databases from.
    admin_database_url: str


class BenchStack:
    """The local stack of the benchmark, or servers named on the command line."""

    def __init__(self, *, kafka_bootstrap: str | None = None,
                 database_url: str | None = None) -> None:
        self.external = kafka_bootstrap is not None and database_url is not None
        self._external = Endpoints(kafka_bootstrap or "", database_url or "")
        self.local = None if self.external else LocalStack(
            root=project_root() / STACK_FOLDER, kafka_port=KAFKA_PORT,
            kafka_controller_port=CONTROLLER_PORT, postgres_port=POSTGRES_PORT,
        )

    @property
    def root(self) -> Path:
        return project_root() / STACK_FOLDER

    def up(self) -> Endpoints:
        if self.local is None:
            return self._external
        endpoints = self.local.up(progress=lambda line: log.info("stack: %s", line))
        return Endpoints(endpoints.kafka_bootstrap_servers, endpoints.database_url)

    def down(self) -> None:
        if self.local is not None:
            self.local.down(progress=lambda line: log.info("stack: %s", line))

    def server_processes(self) -> dict[str, list[psutil.Process]]:
        """The broker's JVM and PostgreSQL's processes, for their CPU; empty when the
        servers are not this benchmark's own."""
        if self.local is None:
            return {}
        marker = str(self.root)
        found: dict[str, list[psutil.Process]] = {"kafka": [], "postgres": []}
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if marker not in command:
                continue
            if "kafka.Kafka" in command:
                found["kafka"].append(process)
            elif "postgres" in command and " -D " in f" {command} ":
                found["postgres"].append(process)
        return found


def connection_for(endpoints: Endpoints) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers=endpoints.kafka_bootstrap_servers)


async def create_database(endpoints: Endpoints, label: str) -> str:
    """A fresh database for one deployment; returns its URL."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(endpoints.admin_database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(endpoints.admin_database_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def drop_database(endpoints: Endpoints, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(endpoints.admin_database_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_topics(connection: KafkaConnection, prefix: str) -> None:
    admin = AIOKafkaAdminClient(**connection.client_options(), request_timeout_ms=30000)
    try:
        await admin.start()
        names = [name for name in await admin.list_topics() if name.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    except Exception as error:
        log.warning("could not delete the topics of %s: %s", prefix, error)
    finally:
        await admin.close()
