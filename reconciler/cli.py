"""The `reconciler` command line, as the contract names it.

Exit status: 0 on success; 2 on bad usage or invalid input, with the reason on stderr; 1 on
any other failure, with a message that names what could not be reached. Settings come from
the environment (and `.env`); the few flags override them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Table

from pydantic import ValidationError

from reconciler.settings import Settings

err = Console(stderr=True, highlight=False)
# Piped output is not cut to 80 columns: a table of long ids would wrap beyond reading.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


class Failure(click.ClickException):
    """Exit 1 with one line: something could not be reached or did not work."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"reconciler: {self.message}", err=True)


class BadInput(click.ClickException):
    """Exit 2 with the reason: bad usage or invalid input."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"reconciler: {self.message}", err=True)


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment, with the command line's options over them; both
    are checked by the same rules."""
    try:
        return Settings(**{Settings.model_fields[k].alias or k: v
                           for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise BadInput(f"invalid settings: {settings_problems(error)}") from None
    except UnicodeDecodeError:
        raise BadInput("invalid settings: the .env file in this folder is not UTF-8 text") from None


def settings_problems(error: ValidationError) -> str:
    """Each bad variable with what is wrong, never its value (it may be a secret)."""
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(message if message.startswith(name) else f"{name}: {message}")
    return "; ".join(problems)


def database_place(url: str) -> str:
    """host:port/database of a DSN, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def run_async(main: Awaitable[Any], settings: Settings | None = None) -> Any:
    """Run a coroutine, turning connection failures into one-line exit-1 messages."""
    try:
        return asyncio.run(main)
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:
        # Output piped to a reader that stopped reading (`| head`): click ends the command
        # quietly (status 1), as it does for output printed outside the event loop.
        raise
    except Exception as error:
        raise Failure(_describe_failure(error, settings)) from None


def _describe_failure(error: BaseException, settings: Settings | None) -> str:
    import ssl

    from aiokafka.errors import KafkaConnectionError, KafkaError

    from streams.connection import KafkaSecurityProblem
    from streams.topics import TopicMisconfigured

    text = _one_line(error)
    if settings is not None:
        if isinstance(error, KafkaConnectionError) or (
            isinstance(error, KafkaError) and "connect" in text.lower()
        ):
            cause = _kafka_problem(settings) or text
            return f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {cause}"
        if isinstance(error, ssl.SSLCertVerificationError):
            text = (
                f"its TLS certificate is not trusted ({error.verify_message}); sslrootcert in "
                f"DATABASE_URL must name the CA that signed it"
            )
        elif isinstance(error, FileNotFoundError) and "ssl" in urlsplit(
            settings.database_url
        ).query:
            # asyncpg's error names no file; the DSN names the files it reads.
            text = (
                f"a file named in DATABASE_URL (sslrootcert, sslcert, sslkey) cannot be read "
                f"({error.strerror})"
            )
        if isinstance(error, (OSError, TimeoutError)) or type(error).__module__.startswith(
            "asyncpg"
        ):
            return f"cannot reach PostgreSQL at {database_place(settings.database_url)}: {text}"
    if isinstance(error, (TopicMisconfigured, KafkaSecurityProblem)) or (
        type(error).__name__ in _SELF_EXPLAINING
    ):
        return text
    return f"{type(error).__name__}: {text}"


async def _broker_answers(start: Awaitable[Any], seconds: float = 30.0) -> None:
    """Start a Kafka client; a broker that does not answer in time is a Kafka failure (a
    bare timeout would be reported as the database's)."""
    from aiokafka.errors import KafkaConnectionError

    try:
        await asyncio.wait_for(start, seconds)
    except TimeoutError:
        raise KafkaConnectionError(f"no answer within {seconds:.0f} s") from None


def _kafka_problem(settings: Settings) -> str | None:
    """Why the broker could not be reached, found again by connecting once more."""
    from reconciler.instance import kafka_connection
    from streams.connection import connection_problem

    try:
        return asyncio.run(connection_problem(kafka_connection(settings), timeout=10.0))
    except Exception:  # the first error is still there to report
        return None


# How long a command waits for its spans to be exported, at most.
TRACE_FLUSH_SECONDS = 2.0

# Errors whose message already says what could not be reached.
_SELF_EXPLAINING = {"DemoError", "StackError", "EndpointsUnavailable"}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Event-driven reconciler of order-pull loops over Kafka and PostgreSQL.

    Config changes arrive on the compacted topic <prefix>.configs; each instance runs one
    pull loop per enabled config of the partitions it owns, never two for one config, and
    reports lifecycle events on <prefix>.task-events. Settings come from the environment
    (see README): KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, RECONCILER_*.
    """
    # Client libraries would otherwise print their own connection errors beside ours.
    from reconciler.logs import setup_logging

    setup_logging(level="WARNING")


# ---- run -----------------------------------------------------------------------------------


@main.command()
@click.option("--instance-id", help="Name of this instance (default: host name + pid).")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format.")
def run(instance_id: str | None, log_format: str | None) -> None:
    """Run one instance until SIGTERM or SIGINT, then shut down gracefully."""
    settings = load_settings(instance_id=instance_id, log_format=log_format)
    run_async(_run_instance(settings), settings)


async def _run_instance(settings: Settings) -> None:
    from reconciler.instance import Instance
    from reconciler.logs import setup_logging
    from reconciler.telemetry import setup_tracing

    setup_logging(level=settings.log_level, json_format=settings.log_format == "json")
    tracing = setup_tracing(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    instance = Instance(settings)
    try:
        await instance.start()
    except BaseException:
        await instance.stop()
        raise
    asked = asyncio.ensure_future(stop.wait())
    told = asyncio.ensure_future(instance.must_stop.wait())
    await asyncio.wait({asked, told}, return_when=asyncio.FIRST_COMPLETED)
    asked.cancel()
    told.cancel()
    flush_seconds = await instance.stop()
    if instance.must_stop_because is not None:
        click.echo(f"reconciler: {instance.must_stop_because}", err=True)
        _leave_after_graceful_stop(tracing, flush_seconds, code=1)
    _leave_after_graceful_stop(tracing, flush_seconds)


def _leave_after_graceful_stop(tracing: Any, flush_seconds: float, *, code: int = 0) -> None:
    """End the process now that the shutdown is done. Waiting for the event loop's other
    tasks and for library threads to wind down (faust's consumer thread keeps waiting for
    a broker that does not answer) would only delay the exit, by minutes in the worst case."""
    import logging
    import os

    from reconciler.telemetry import flush_within

    # Within what is left of the shutdown budget: an exporter endpoint that does not answer
    # would hold the exit for its own timeout.
    flush_within(tracing.force_flush, flush_seconds)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- config --------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Publish, check and change configs."""


def _flush_traces(provider: Any) -> None:
    """Export a command's spans, waiting 2 s at most for an exporter endpoint."""
    from reconciler.telemetry import flush_within

    flush_within(provider.force_flush, TRACE_FLUSH_SECONDS)


def _tracing(settings: Settings) -> Any:
    from reconciler.telemetry import setup_tracing

    return setup_tracing(settings)


def _read_document(file: str) -> bytes:
    if file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(file).read_bytes()
    except OSError as error:
        raise BadInput(f"cannot read {file}: {error.strerror}") from None


@config.command("validate")
@click.argument("file")
def config_validate(file: str) -> None:
    """Validate FILE (one config object or an array of them; - for stdin) without publishing."""
    from streams.configs import check_document

    configs, problems = check_document(_read_document(file))
    for problem in problems:
        click.echo(problem)
    if problems:
        raise BadInput(f"{len(problems)} problem(s) in {file}")
    click.echo(f"{len(configs)} valid config{'s' if len(configs) != 1 else ''}")


@config.command("put")
@click.argument("file")
def config_put(file: str) -> None:
    """Publish the configs in FILE (- for stdin), only if every one of them is valid."""
    from streams.configs import check_document

    configs, problems = check_document(_read_document(file))
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        raise BadInput(f"nothing published: {len(problems)} problem(s) in {file}")
    settings = load_settings()
    provider = _tracing(settings)
    try:
        run_async(_publish_configs(settings, [(c.id, c.to_json_bytes()) for c in configs]),
                  settings)
    finally:
        _flush_traces(provider)
    click.echo(f"published {len(configs)} config{'s' if len(configs) != 1 else ''}")


async def _publish_configs(settings: Settings, records: list[tuple[str, bytes | None]]) -> None:
    from streams.publisher import OutgoingRecord, Publisher
    from streams.topics import Topics, ensure_topics
    from streams.tracing import headers_with_context, producer_span
    from reconciler.instance import kafka_connection

    connection = kafka_connection(settings)
    topics = Topics(settings.topic_prefix)
    await asyncio.wait_for(
        ensure_topics(connection, topics, config_partitions=settings.config_partitions), 30
    )
    publisher = Publisher(connection)
    await _broker_answers(publisher.start())
    try:
        for key, value in records:
            # One `send` span per record; its context travels in the record's traceparent.
            with producer_span("send", topics.configs, key=key,
                               attributes={"config_id": key}):
                record = OutgoingRecord(key=key.encode(), value=value,
                                        headers=headers_with_context())
                await asyncio.wait_for(publisher.send(topics.configs, record), 30)
    finally:
        await publisher.stop()


@config.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of a config."""
    from streams.configs import config_json_schema

    click.echo(json.dumps(config_json_schema(), indent=2))


def _change_command(name: str, help_text: str) -> Callable[[str], None]:
    @config.command(name, help=help_text)
    @click.argument("config_id")
    def command(config_id: str) -> None:
        settings = load_settings()
        record = run_async(_changed_record(settings, config_id, name), settings)
        provider = _tracing(settings)
        try:
            run_async(_publish_configs(settings, [record]), settings)
        finally:
            _flush_traces(provider)
        click.echo(f"published {name} of {config_id}")

    return command


async def _changed_record(
    settings: Settings, config_id: str, change: str
) -> tuple[str, bytes | None]:
    import asyncpg

    from streams.configs import (CONFIG_ID_RULE, MAX_VERSION, config_from_json_dict,
                                 is_valid_config_id, shorten)

    if not is_valid_config_id(config_id):
        shown = ascii(config_id.encode("utf-8", "surrogateescape"))[2:-1]
        raise BadInput(f"config id {shorten(shown, 80)} is not valid: an id is "
                       f"{CONFIG_ID_RULE}")
    conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), 15)
    try:
        row = await conn.fetchrow(
            "SELECT config, deleted, config_version FROM pull_tasks WHERE config_id = $1",
            config_id,
        )
    except asyncpg.UndefinedTableError:
        row = None
    finally:
        await conn.close()
    named = shorten(config_id, 80)
    if row is None or row["config"] is None:
        raise BadInput(f"config {named} is not known (no desired state in the database)")
    if row["deleted"]:
        if row["config_version"] == MAX_VERSION:
            raise BadInput(f"config {named} was deleted at the highest version ({MAX_VERSION}); "
                           "it cannot come back under its id: publish it under a new id")
        above = ("" if row["config_version"] is None
                 else f" with a version above {row['config_version']}")
        raise BadInput(f"config {named} is deleted; publish it again with `config put`{above}")
    current = config_from_json_dict(json.loads(row["config"]), expected_id=config_id)
    if change == "delete":
        return config_id, None
    if current.version == MAX_VERSION:
        raise BadInput(
            f"config {config_id} is at the highest version ({MAX_VERSION}); it cannot be "
            f"{change}d by a newer one"
        )
    changes: dict[str, Any] = {"enabled": change == "enable"}
    if current.version is not None:
        changes["version"] = current.version + 1
    return config_id, current.with_changes(**changes).to_json_bytes()


config_enable = _change_command("enable", "Enable CONFIG_ID (version + 1 when versioned).")
config_disable = _change_command("disable", "Disable CONFIG_ID (version + 1 when versioned).")
config_delete = _change_command("delete", "Delete CONFIG_ID: publish a tombstone.")


# ---- status and events ---------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per config.")
def status(as_json: bool) -> None:
    """Print the running-task table."""
    settings = load_settings()
    rows, instances = run_async(_status_rows(settings), settings)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    table = Table(title=f"pull_tasks ({len(rows)} configs)")
    for column in ("config", "enabled", "state", "run", "fence", "owner", "lease left",
                   "last pull", "attempts", "cursor", "last error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["config_id"], str(row["enabled"]), row["state"], (row["run_id"] or "")[:8],
            str(row["fence"]), row["owner"] or "", _seconds(row["lease_seconds_left"]),
            str(row["last_pull_at"] or "")[:19], str(row["attempts"]), row["cursor"] or "",
            (row["last_error"] or "")[:60],
        )
    out.print(table)
    for line in _instance_lines(instances, rows, alive_within=settings.lease_seconds):
        click.echo(line)


def _instance_lines(instances: list[dict], rows: list[dict], *,
                    alive_within: float) -> list[str]:
    """One line per instance seen in the last ten minutes: what it holds and runs."""
    held: dict[str, int] = {}
    for row in rows:
        if row["owner_boot"] and row["state"] in ("running", "stopping"):
            held[row["owner_boot"]] = held.get(row["owner_boot"], 0) + 1
    lines = []
    for instance in instances:
        if instance["stopped"]:
            status = "stopped"
        elif instance["seen_seconds_ago"] > alive_within:
            # Not seen for a lease: its runs have stopped themselves or will be taken over.
            status = f"silent for {instance['seen_seconds_ago']:.0f} s"
        else:
            status = f"alive, seen {instance['seen_seconds_ago']:.1f} s ago"
        partitions = ",".join(str(p) for p in instance["partitions"]) or "none"
        lines.append(
            f"instance {instance['instance_id']} (boot {instance['boot_id'][:8]}): {status}; "
            f"partitions {partitions}; {held.get(instance['boot_id'], 0)} leases held"
        )
    return lines


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


async def _status_rows(settings: Settings) -> tuple[list[dict], list[dict]]:
    import asyncpg

    conn = await asyncio.wait_for(asyncpg.connect(settings.database_url), 15)
    instances: list = []
    try:
        rows = await conn.fetch(
            """
            SELECT config_id, enabled, deleted, config_version, state, run_id, fence, owner,
                   EXTRACT(EPOCH FROM (lease_expires_at - now()))::float8 AS lease_seconds_left,
                   started_at, stopped_at, last_pull_at, last_error, attempts, retry_at,
                   cursor, updated_at, owner_boot
            FROM pull_tasks ORDER BY config_id
            """
        )
        instances = await conn.fetch(
            """
            SELECT instance_id, boot_id, partitions, stopped_at IS NOT NULL AS stopped,
                   EXTRACT(EPOCH FROM (now() - last_seen))::float8 AS seen_seconds_ago
            FROM reconciler_instances
            WHERE last_seen > now() - interval '10 minutes'
            ORDER BY instance_id, started_at
            """
        )
    except asyncpg.UndefinedTableError:
        rows = []
    finally:
        await conn.close()
    return [dict(row) for row in rows], [dict(row) for row in instances]


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="Print each CloudEvent as JSON.")
def events(follow: bool, as_json: bool) -> None:
    """Print lifecycle events from <prefix>.task-events, oldest first."""
    settings = load_settings()
    run_async(_print_events(settings, follow=follow, as_json=as_json), settings)


async def _print_events(settings: Settings, *, follow: bool, as_json: bool) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.lifecycle import decode_lifecycle_event
    from streams.topics import Topics
    from reconciler.instance import kafka_connection

    topic = Topics(settings.topic_prefix).task_events
    consumer = AIOKafkaConsumer(
        **kafka_connection(settings).client_options(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    try:
        await _broker_answers(consumer.start())
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            raise Failure(f"topic {topic} does not exist (no instance has started yet?)")
        from aiokafka import TopicPartition

        assignment = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assignment)
        await consumer.seek_to_beginning(*assignment)
        ends = await consumer.end_offsets(assignment)
        backlog: list[bytes] = []
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if follow:
                        _print_event(record.value, decode_lifecycle_event, as_json)
                    else:
                        backlog.append(record.value)
            if not follow:
                positions = {tp: await consumer.position(tp) for tp in assignment}
                if all(positions[tp] >= ends[tp] for tp in assignment):
                    # Partitions are read one after another: put the events in time order.
                    for value in sorted(backlog, key=_event_time):
                        _print_event(value, decode_lifecycle_event, as_json)
                    if not backlog and not as_json:
                        click.echo(f"no lifecycle events in {topic} yet", err=True)
                    return
    finally:
        await consumer.stop()


def _event_time(value: bytes | None) -> str:
    try:
        return str(json.loads(value).get("time", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def _print_event(value: bytes | None, decode: Callable[[bytes], dict], as_json: bool) -> None:
    if value is None:
        err.print("skipping a record that is not a lifecycle event: it has no value",
                  markup=False)
        return
    try:
        event = decode(value)
    except ValueError as error:
        err.print(f"skipping a record that is not a lifecycle event: {error}", markup=False)
        return
    if as_json:
        click.echo(json.dumps(event))
        return
    data = event["data"]
    extra = ""
    if data.get("reason"):
        extra += f" reason={data['reason']}"
    if data.get("error"):
        extra += f" error={data['error']!r} retry_in={data.get('retry_in_seconds')}s"
    click.echo(
        f"{event['time']} {event['type'].rsplit('.', 1)[-1]:8} {data['config_id']} "
        f"run={data['run_id'][:8]} fence={data['fence']} instance={data['instance_id']}{extra}"
    )


# ---- local stack, demo, sample source ------------------------------------------------------


@main.group()
def dev() -> None:
    """The local stack: a single-node Kafka and a PostgreSQL on 127.0.0.1, data in .stack/."""


@dev.command("up")
@click.option("--with-jaeger", is_flag=True,
              help="Also run Jaeger (traces in memory), built with Go on first use.")
def dev_up(with_jaeger: bool) -> None:
    """Start the local stack (idempotent) and print how to use it."""
    from reconciler.localstack import StackError, default_stack

    stack = default_stack()
    try:
        stack.up(with_jaeger=with_jaeger, progress=lambda line: err.print(line, markup=False))
    except StackError as error:
        raise Failure(str(error)) from None
    if with_jaeger:
        # Built from the Go module alone, Jaeger serves its query API but no real UI page.
        click.echo(
            f"Jaeger UI at {stack.jaeger_query_url} (a placeholder page in this build), "
            f"traces at {stack.jaeger_query_url}/api/traces?service=reconciler",
            err=True,
        )
    for name, value in stack.env().items():
        click.echo(f"export {name}={value}")


@dev.command("down")
def dev_down() -> None:
    """Stop exactly the processes `dev up` started."""
    from reconciler.localstack import StackError, default_stack

    try:
        default_stack().down(progress=lambda line: err.print(line, markup=False))
    except StackError as error:
        raise Failure(str(error)) from None


@dev.command("env")
def dev_env() -> None:
    """Print `export NAME=value` lines that point at the local stack."""
    from reconciler.localstack import default_stack

    for name, value in default_stack().env().items():
        click.echo(f"export {name}={value}")


@main.command()
def demo() -> None:
    """Run the main job on sample input and print a summary; exit 0 only if it ended right."""
    from reconciler.demo import run_demo
    from reconciler.localstack import default_stack
    from reconciler.logs import setup_logging
    from reconciler.telemetry import setup_tracing

    settings = load_settings(http_port=0)
    jaeger = None
    if settings.uses_local_stack and default_stack().jaeger_is_running():
        # `dev up --with-jaeger` ran: the demo's traces go there.
        jaeger = default_stack().jaeger_query_url
        settings = settings.model_copy(update={
            "otel_exporter_otlp_endpoint": default_stack().env()["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "otel_traces_exporter": "otlp",
        })
    setup_logging(level="WARNING", json_format=False)
    provider = setup_tracing(settings)
    ok = run_async(run_demo(settings, console=out), settings)
    provider.force_flush()
    if jaeger:
        out.print(f"traces of this demo: {jaeger}/api/traces?service="
                  f"{settings.otel_service_name} (Jaeger's query API; find a config change by "
                  "its `send ….configs` span and follow the links to its pulls)")
    raise SystemExit(0 if ok else 1)


@main.command("sample-source")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=click.IntRange(0, 65535))
@click.option("--rate", default=2.0, show_default=True, type=float,
              help="Orders per second per channel and product.")
def sample_source(host: str, port: int, rate: float) -> None:
    """Serve made-up orders as an HTTP order source, for trying the product."""
    from reconciler.sample_source import serve_forever

    click.echo(f"serving made-up orders at http://{host}:{port}/orders (Ctrl-C stops)")
    run_async(serve_forever(host, port, rate))


if __name__ == "__main__":
    main()
