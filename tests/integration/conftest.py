"""Fixtures of the integration tests: the real broker and database, one deployment per test.

The local stack is brought up once per session (the same code as `reconciler dev up`)
unless KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL point elsewhere; it is stopped at the end
only if this session started it. Each test gets its own deployment, as the contract defines
one: its own topic prefix and its own PostgreSQL database.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from reconciler.settings import Settings
from tests.integration.harness import deployment_with_source
from tests.integration.relay import Relay


@pytest.fixture(scope="session")
def local_stack():
    """The local stack the tests run on, or None when the environment names other servers."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"):
        yield None
        return
    from reconciler.localstack import LocalStack, default_stack, project_root

    # RECONCILER_TEST_STACK=<kafka port>,<controller port>,<postgres port> runs the session
    # on a stack of its own (in .stack-<kafka port>/), beside the default one.
    ports = os.environ.get("RECONCILER_TEST_STACK")
    if ports:
        kafka, controller, postgres = (int(p) for p in ports.split(","))
        stack = LocalStack(root=project_root() / f".stack-{kafka}", kafka_port=kafka,
                           kafka_controller_port=controller, postgres_port=postgres)
    else:
        stack = default_stack()
    was_running = stack.is_running()
    stack.up(progress=print)
    yield stack
    if not was_running and os.environ.get("RECONCILER_TEST_KEEP_STACK") != "1":
        stack.down(progress=print)


@pytest.fixture(scope="session")
def secure_stack():
    """A second local stack whose broker has a SASL_SSL listener (SCRAM-SHA-512) and whose
    PostgreSQL takes TLS only, for the tests of secured connections; None when the
    environment names other servers.

    Its ports sit 100 above the session's Kafka ports (SASL_SSL at the Kafka port + 104) and
    one above its PostgreSQL port, in `.stack-secure-<kafka port>/`; it is stopped at the end
    like the session's stack. PostgreSQL runs without TLS where its binaries cannot do TLS
    (`secure_stack.secure.postgres_tls` says which).
    """
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"):
        yield None
        return
    from reconciler.localstack import (
        LocalStack, SecureListeners, postgres_supports_tls, project_root,
        system_postgres_binaries,
    )

    ports = os.environ.get("RECONCILER_TEST_STACK")
    kafka, controller, postgres = (
        (int(p) for p in ports.split(",")) if ports else (9092, 9093, 15432)
    )
    kafka, controller, postgres = kafka + 100, controller + 100, postgres + 1
    # TLS needs PostgreSQL built with OpenSSL: the embedded one is not, a system package
    # (Debian's `postgresql`) usually is; such a stack keeps its data in a folder of its own.
    binaries = None if postgres_supports_tls() else system_postgres_binaries()
    root = project_root() / f".stack-secure-{kafka}{'-system-pg' if binaries else ''}"
    stack = LocalStack(root=root, kafka_port=kafka,
                       kafka_controller_port=controller, postgres_port=postgres,
                       secure=SecureListeners(kafka_port=kafka + 4,
                                              postgres_tls=postgres_supports_tls(binaries)),
                       postgres_binaries=binaries)
    was_running = stack.is_running()
    stack.up(progress=print)
    yield stack
    if not was_running and os.environ.get("RECONCILER_TEST_KEEP_STACK") != "1":
        stack.down(progress=print)


@pytest.fixture(scope="session")
def endpoints(local_stack) -> dict[str, str]:
    if local_stack is None:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
            "DATABASE_URL": os.environ["DATABASE_URL"],
        }
    return local_stack.env()


@pytest.fixture
def stack(local_stack):
    """The local stack, for tests that stop, restart or cut off its servers."""
    if local_stack is None:
        pytest.skip("needs the local stack (KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL are set)")
    yield local_stack
    # Whatever a test stopped runs again for the next one.
    local_stack.up()


@pytest.fixture
async def kafka_relay(stack):
    """Starts a `Relay` in front of the broker for a test (in front of the listener the
    broker keeps for relays, so that what the broker advertises leads through it again);
    every relay started is stopped after the test."""
    started: list[Relay] = []

    async def start(*, kafka_requests: bool = False) -> Relay:
        relay_port, relayed_port = stack.kafka_relay_ports
        relay = Relay(target_port=relayed_port, listen_port=relay_port,
                      kafka_requests=kafka_requests)
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.stop()


@pytest.fixture
async def database_url(endpoints: dict[str, str]) -> str:
    """A database of its own for one test, dropped afterwards."""
    admin_url = endpoints["DATABASE_URL"]
    name = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin_url)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def settings(endpoints: dict[str, str], database_url: str) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return Settings(
        KAFKA_BOOTSTRAP_SERVERS=endpoints["KAFKA_BOOTSTRAP_SERVERS"],
        DATABASE_URL=database_url,
        RECONCILER_TOPIC_PREFIX=prefix,
        RECONCILER_INSTANCE_ID=f"{prefix}-a",
        RECONCILER_CONFIG_PARTITIONS=3,
        RECONCILER_HTTP_PORT=0,
    )


@pytest.fixture
async def deployment(settings: Settings):
    async with deployment_with_source(settings) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def _span_store():
    """Every span of the test process, in memory; instances in the process report here."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def spans(_span_store):
    """The span exporter, emptied for this test."""
    _span_store.clear()
    yield _span_store
    _span_store.clear()
