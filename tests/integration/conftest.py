"""Fixtures of the integration tests: the real broker and database, one deployment per test.

The local stack is brought up once per session (the same code as `reconciler dev up`)
unless KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL point elsewhere; it is stopped at the end
only if this session started it. Each test gets its own deployment, as the contract defines
one: its own topic prefix and its own PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from reconciler.settings import Settings
from tests.integration.harness import Deployment


@pytest.fixture(scope="session")
def endpoints() -> dict[str, str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"):
        yield {
            "KAFKA_BOOTSTRAP_SERVERS": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
            "DATABASE_URL": os.environ["DATABASE_URL"],
        }
        return
    from reconciler.localstack import default_stack

    stack = default_stack()
    was_running = stack.is_running()
    stack.up(progress=print)
    yield stack.env()
    if not was_running and os.environ.get("RECONCILER_TEST_KEEP_STACK") != "1":
        stack.down(progress=print)


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
