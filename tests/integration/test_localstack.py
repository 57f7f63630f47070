"""The local stack, started for real: a Kafka broker and a PostgreSQL server under a
temporary folder, on free ports of their own so that they never meet the default stack
(`reconciler dev up`) or another test session on the same machine.

The tests that share the module's stack run in file order and leave it running, except the
last of them, which takes it down.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from reconciler.localstack import LocalStack, StackEndpoints, StackError

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def recorded_pids(root: Path) -> tuple[int, int]:
    """The broker's and the postmaster's pids, as the stack's folder records them."""
    kafka = int((root / "kafka" / "kafka.pid").read_text().split()[0])
    postgres = int((root / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    return kafka, postgres


def runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def create_topic(bootstrap_servers: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()


async def list_topics(bootstrap_servers: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(
        root=tmp_path_factory.mktemp("stack"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        postgres_port=free_port(),
    )
    yield stack
    stack.down()


@pytest.fixture
def running(stack: LocalStack) -> StackEndpoints:
    return stack.up()


async def test_up_starts_a_broker_that_delivers_a_record_with_its_headers(
    running: StackEndpoints,
) -> None:
    topic = f"localstack-{uuid.uuid4().hex[:8]}"
    await create_topic(running.kafka_bootstrap_servers, topic)
    producer = AIOKafkaProducer(bootstrap_servers=running.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, b"value", key=b"key", headers=[("config-id", b"shop-1.sku-1")]
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=running.kafka_bootstrap_servers,
        group_id=f"{topic}.group",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()

    assert (record.key, record.value) == (b"key", b"value")
    assert list(record.headers) == [("config-id", b"shop-1.sku-1")]


async def test_up_starts_postgres_where_the_reconciler_role_owns_its_database(
    running: StackEndpoints,
) -> None:
    connection = await asyncpg.connect(running.database_url)
    try:
        row = await connection.fetchrow(
            "SELECT current_user, current_database(), pg_get_userbyid(datdba) AS owner, "
            "(SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user) AS createdb, "
            "current_setting('max_connections') AS max_connections "
            "FROM pg_database WHERE datname = current_database()"
        )
    finally:
        await connection.close()

    assert dict(row) == {
        "current_user": "reconciler",
        "current_database": "reconciler",
        "owner": "reconciler",
        "createdb": True,
        "max_connections": "300",
    }


async def test_up_again_from_a_thread_returns_at_once_with_the_same_processes(
    stack: LocalStack, running: StackEndpoints
) -> None:
    pids_before = recorded_pids(stack.root)

    began = time.monotonic()
    endpoints = await asyncio.to_thread(stack.up)
    elapsed = time.monotonic() - began

    assert endpoints == running
    assert recorded_pids(stack.root) == pids_before
    assert elapsed < 2.0
    assert await asyncio.to_thread(stack.is_running)


def test_env_points_at_the_ports_of_this_stack(stack: LocalStack) -> None:
    kafka_port, postgres_port = stack.kafka_port, stack.postgres_port

    assert stack.env() == {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "DATABASE_URL": f"postgresql://reconciler@127.0.0.1:{postgres_port}/reconciler",
    }


async def test_a_killed_broker_comes_back_with_its_topics_after_start_kafka(
    stack: LocalStack, running: StackEndpoints
) -> None:
    topic = f"localstack-{uuid.uuid4().hex[:8]}"
    await create_topic(running.kafka_bootstrap_servers, topic)
    kafka_pid, _ = recorded_pids(stack.root)

    await asyncio.to_thread(stack.stop_kafka, kill=True)
    assert not runs(kafka_pid)
    assert not await asyncio.to_thread(stack.is_running)

    await asyncio.to_thread(stack.start_kafka)
    assert topic in await list_topics(running.kafka_bootstrap_servers)
    assert await asyncio.to_thread(stack.is_running)


async def test_postgres_stopped_immediately_comes_back_with_its_data_after_start_postgres(
    stack: LocalStack, running: StackEndpoints
) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(running.database_url)
    await connection.execute(f"CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (7)")
    await connection.close()
    _, postgres_pid = recorded_pids(stack.root)

    await asyncio.to_thread(stack.stop_postgres, immediate=True)
    assert not runs(postgres_pid)
    with pytest.raises(OSError):
        await asyncpg.connect(running.database_url, timeout=5)

    await asyncio.to_thread(stack.start_postgres)
    connection = await asyncpg.connect(running.database_url)
    try:
        assert await connection.fetchval(f"SELECT id FROM {table}") == 7
    finally:
        await connection.close()


def test_down_stops_both_processes_and_frees_the_ports(
    stack: LocalStack, running: StackEndpoints
) -> None:
    kafka_pid, postgres_pid = recorded_pids(stack.root)
    messages: list[str] = []

    stack.down(progress=messages.append)

    assert not runs(kafka_pid)
    assert not runs(postgres_pid)
    ports = [stack.kafka_port, stack.kafka_controller_port, stack.postgres_port]
    assert [port_is_free(port) for port in ports] == [True, True, True]
    assert not stack.is_running()
    assert messages == [
        f"stopping Kafka (pid {kafka_pid})",
        "Kafka stopped",
        f"stopping PostgreSQL (pid {postgres_pid})",
        "PostgreSQL stopped",
    ]

    messages.clear()
    stack.down(progress=messages.append)
    assert messages == ["the local stack is not running"]


@pytest.mark.parametrize(
    ("taken", "hint"),
    [
        ("kafka_port", "KAFKA_BOOTSTRAP_SERVERS"),
        ("kafka_controller_port", "KAFKA_BOOTSTRAP_SERVERS"),
        ("postgres_port", "DATABASE_URL"),
    ],
)
def test_up_refuses_a_port_taken_by_another_process_and_starts_nothing(
    tmp_path: Path, taken: str, hint: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        ports = {
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
            "postgres_port": free_port(),
            taken: port,
        }
        stack = LocalStack(root=tmp_path / "stack", **ports)

        with pytest.raises(StackError) as refusal:
            stack.up()

    assert f"port {port} on 127.0.0.1 is taken by another process" in str(refusal.value)
    assert hint in str(refusal.value)
    assert not (tmp_path / "stack" / "kafka" / "kafka.pid").exists()
    assert not (tmp_path / "stack" / "postgres" / "data").exists()


def test_up_without_java_on_the_path_asks_for_a_jdk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    stack = LocalStack(
        root=tmp_path / "stack",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        postgres_port=free_port(),
    )

    with pytest.raises(StackError, match=r"^Java 17 or newer is needed .*not found on PATH"):
        stack.up()


def test_a_broker_that_exits_while_starting_fails_up_at_once_naming_its_log(
    tmp_path: Path,
) -> None:
    stack = LocalStack(
        root=tmp_path / "stack",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        postgres_port=free_port(),
    )
    # Storage formatted for another node id: the broker refuses it and exits.
    data = tmp_path / "stack" / "kafka" / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text(
        "version=1\nnode.id=2\ncluster.id=q1Sh-9_ISia_zwGINzRvyQ\n"
        "directory.id=AAAAAAAAAAAAAAAAAAAAAQ\n"
    )

    began = time.monotonic()
    with pytest.raises(StackError) as failure:
        stack.up()

    assert str(failure.value).startswith("Kafka stopped while starting")
    assert str(tmp_path / "stack" / "kafka" / "server.log") in str(failure.value)
    assert time.monotonic() - began < 60
    assert not (tmp_path / "stack" / "postgres" / "data").exists()
