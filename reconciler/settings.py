"""The one typed settings object of an instance, read once from the environment.

Every variable of the public contract is here with its contract default; the rest are this
implementation's own knobs (lease timing, backoff, timeouts), documented in the README.
Flags of the command line override fields by building a copy with `model_copy(update=...)`.
Nothing else in the project reads the environment.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reconciler.addresses import DEFAULT_REFUSED_NETWORKS, parse_hosts, parse_networks

LOCAL_KAFKA = "127.0.0.1:9092"
LOCAL_DATABASE_URL = "postgresql://reconciler@127.0.0.1:15432/reconciler"
# The SASL mechanisms that need nothing but a user name and a password.
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    # No setting is infinite or not a number.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True,
                                      allow_inf_nan=False)

    kafka_bootstrap_servers: str = Field(LOCAL_KAFKA, alias="KAFKA_BOOTSTRAP_SERVERS")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: str | None = Field(None, alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: str | None = Field(None, alias="KAFKA_SASL_PASSWORD", repr=False)
    kafka_ssl_cafile: str | None = Field(None, alias="KAFKA_SSL_CAFILE")

    database_url: str = Field(LOCAL_DATABASE_URL, alias="DATABASE_URL", repr=False)

    # Named in every event's `source` (`reconciler/<instance id>`): printable, no spaces.
    instance_id: str = Field(default_factory=default_instance_id, alias="RECONCILER_INSTANCE_ID")
    # Kafka topic names are at most 249 characters; the longest is `<prefix>.configs.dlq`.
    topic_prefix: str = Field("pull", alias="RECONCILER_TOPIC_PREFIX",
                              pattern=r"^[A-Za-z0-9._-]+$", max_length=237)
    group_id_setting: str | None = Field(None, alias="RECONCILER_GROUP_ID")
    config_partitions: int = Field(12, alias="RECONCILER_CONFIG_PARTITIONS", ge=1, le=10_000)
    max_record_bytes: int = Field(65536, alias="RECONCILER_MAX_RECORD_BYTES", ge=1)
    http_port: int = Field(8080, alias="RECONCILER_HTTP_PORT", ge=0, le=65535)
    # Where the HTTP endpoints listen; set 0.0.0.0 where an orchestrator probes from outside.
    http_host: str = Field("127.0.0.1", alias="RECONCILER_HTTP_HOST")
    # Per-config series of the pull counters; off, because they grow with the configs.
    metrics_per_config: bool = Field(False, alias="RECONCILER_METRICS_PER_CONFIG")
    secrets_dir: str | None = Field(None, alias="RECONCILER_SECRETS_DIR")

    # The HTTP order source (see `reconciler.addresses` and `reconciler.source`). Hosts and
    # networks are comma-separated; `.example.com` stands for every name below example.com.
    # An empty allowed list allows all; a refused network wins over an allowed one. Every
    # address is checked when a connection is made, after the name was resolved.
    source_allowed_hosts: str = Field("", alias="RECONCILER_SOURCE_ALLOWED_HOSTS")
    source_allowed_networks: str = Field("", alias="RECONCILER_SOURCE_ALLOWED_NETWORKS")
    source_refused_networks: str = Field(
        DEFAULT_REFUSED_NETWORKS, alias="RECONCILER_SOURCE_REFUSED_NETWORKS"
    )
    # Requests in flight to one host name at a time; waiting for a turn counts against the
    # config's timeout.
    source_max_requests_per_host: int = Field(
        8, alias="RECONCILER_SOURCE_MAX_REQUESTS_PER_HOST", ge=1, le=10_000
    )
    # One answer's body, after decompression; a larger one is a failed pull.
    source_max_body_bytes: int = Field(
        16 * 1024 * 1024, alias="RECONCILER_SOURCE_MAX_BODY_BYTES", ge=1024
    )
    # Pages with orders in one pull; past it the pull fails and the next run goes on from
    # the saved cursor.
    source_max_pages_per_pull: int = Field(
        1000, alias="RECONCILER_SOURCE_MAX_PAGES_PER_PULL", ge=1
    )

    # Leases: a run may act only until `renewal sent + lease_seconds - lease_margin_seconds`
    # by the monotonic clock; renewals go out every `lease_renew_seconds`.
    # At most the broker's default transaction.max.timeout.ms (15 min): a run's orders are
    # sent in transactions that time out with its lease.
    lease_seconds: float = Field(10.0, alias="RECONCILER_LEASE_SECONDS", gt=0, le=900)
    lease_renew_seconds: float = Field(3.0, alias="RECONCILER_LEASE_RENEW_SECONDS", gt=0)
    lease_margin_seconds: float = Field(2.0, alias="RECONCILER_LEASE_MARGIN_SECONDS", ge=0)

    # How long a stop waits for a loop to end before reporting it stuck (it stays `stopping`).
    stop_timeout_seconds: float = Field(5.0, alias="RECONCILER_STOP_TIMEOUT_SECONDS", gt=0)
    # The whole graceful shutdown at most, however many servers are unreachable; within the
    # 30 s an orchestrator usually grants before it kills.
    shutdown_timeout_seconds: float = Field(
        25.0, alias="RECONCILER_SHUTDOWN_TIMEOUT_SECONDS", gt=0
    )
    # A pull that makes no progress for its request timeout plus this is hung: the watchdog
    # ends its run as failed.
    hang_grace_seconds: float = Field(15.0, alias="RECONCILER_HANG_GRACE_SECONDS", gt=0)
    # Backoff after a failed run: first delay, cap, both in seconds.
    backoff_initial_seconds: float = Field(1.0, alias="RECONCILER_BACKOFF_INITIAL_SECONDS", gt=0)
    backoff_max_seconds: float = Field(300.0, alias="RECONCILER_BACKOFF_MAX_SECONDS", gt=0)
    # Full resync of owned configs, jittered by up to a fifth of the period.
    resync_seconds: float = Field(120.0, alias="RECONCILER_RESYNC_SECONDS", gt=0)
    # Parallel reconciles; each holds at most one database connection at a time.
    reconcile_workers: int = Field(8, alias="RECONCILER_WORKERS", ge=1, le=256)
    db_pool_size: int = Field(10, alias="RECONCILER_DB_POOL_SIZE", ge=2)
    db_timeout_seconds: float = Field(10.0, alias="RECONCILER_DB_TIMEOUT_SECONDS", gt=0)
    # Within the broker's default bounds (group.min.session.timeout.ms 6 s,
    # group.max.session.timeout.ms 30 min): outside them the broker refuses every join.
    kafka_session_timeout_seconds: float = Field(
        10.0, alias="RECONCILER_KAFKA_SESSION_TIMEOUT_SECONDS", ge=6.0, le=1800.0
    )
    kafka_heartbeat_seconds: float = Field(3.0, alias="RECONCILER_KAFKA_HEARTBEAT_SECONDS",
                                           gt=0)
    otel_service_name: str = Field("reconciler", alias="OTEL_SERVICE_NAME")
    otel_exporter_otlp_endpoint: str | None = Field(None, alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_metrics_exporter: str | None = Field(None, alias="OTEL_METRICS_EXPORTER")
    otel_traces_exporter: str | None = Field(None, alias="OTEL_TRACES_EXPORTER")
    # An enabled config counts as not running once it has been so for this long.
    not_running_threshold_seconds: float = Field(
        60.0, alias="RECONCILER_NOT_RUNNING_THRESHOLD_SECONDS", gt=0
    )
    # Static membership (group.instance.id): opt-in, with an explicit id that stays the
    # same across restarts. A quick restart then moves no partition, but a departed
    # instance is noticed only after the session timeout.
    static_member_id: str | None = Field(None, alias="RECONCILER_STATIC_MEMBER_ID")
    log_format: Literal["text", "json"] = Field("text", alias="RECONCILER_LOG_FORMAT")
    log_level: str = Field("INFO", alias="RECONCILER_LOG_LEVEL")

    @field_validator("log_level")
    @classmethod
    def _log_level_is_known(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("database_url")
    @classmethod
    def _database_url_is_a_postgresql_url(cls, value: str) -> str:
        # The message never repeats the value: it may hold a password.
        parts = urlsplit(value)
        rest = value.split("://", 1)[-1]
        userinfo = rest.rsplit("@", 1)[0] if "@" in rest else ""
        problem = None
        if parts.scheme not in ("postgresql", "postgres"):
            problem = "must start with postgresql://"
        elif any(c in userinfo for c in "?#/"):
            problem = "has '?', '#' or '/' in its user or password; percent-encode them"
        else:
            try:
                parts.port
            except ValueError:
                problem = "has a port that is not a number from 0 to 65535"
        if problem:
            raise ValueError(f"DATABASE_URL {problem}")
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_servers_are_host_and_port(cls, value: str) -> str:
        for server in value.split(","):
            server = server.strip()
            host, colon, port = server.rpartition(":")
            if not colon:
                host, port = server, "9092"  # the clients' default port
            if (not host or any(c.isspace() for c in host) or not port.isdigit()
                    or not 0 < int(port) < 65536):
                raise ValueError(
                    f"KAFKA_BOOTSTRAP_SERVERS must be host[:port][,host[:port]...]; "
                    f"{server!r} is not"
                )
        return value

    @field_validator("source_allowed_networks", "source_refused_networks")
    @classmethod
    def _networks_parse(cls, value: str, info: ValidationInfo) -> str:
        alias = cls.model_fields[info.field_name].alias
        parse_networks(value, setting=alias)
        return value

    @field_validator("instance_id")
    @classmethod
    def _instance_id_is_a_name(cls, value: str) -> str:
        if not 1 <= len(value) <= 200 or not all("!" <= c <= "~" for c in value):
            raise ValueError("must be 1 to 200 printable ASCII characters without spaces")
        return value

    @field_validator("source_allowed_hosts")
    @classmethod
    def _hosts_parse(cls, value: str) -> str:
        parse_hosts(value, setting="RECONCILER_SOURCE_ALLOWED_HOSTS")
        return value

    @model_validator(mode="after")
    def _lease_timing_is_consistent(self) -> "Settings":
        if self.lease_renew_seconds + self.lease_margin_seconds >= self.lease_seconds:
            raise ValueError(
                "lease timing: RECONCILER_LEASE_RENEW_SECONDS + RECONCILER_LEASE_MARGIN_SECONDS "
                "must be shorter than RECONCILER_LEASE_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_fits_the_session(self) -> "Settings":
        # The broker drops a member whose heartbeats are further apart than its session;
        # with less than two heartbeats per session one late heartbeat is enough.
        if self.kafka_heartbeat_seconds * 2 > self.kafka_session_timeout_seconds:
            raise ValueError(
                "RECONCILER_KAFKA_HEARTBEAT_SECONDS must be at most half of "
                "RECONCILER_KAFKA_SESSION_TIMEOUT_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _backoff_is_consistent(self) -> "Settings":
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError(
                "backoff: RECONCILER_BACKOFF_MAX_SECONDS must not be shorter than "
                "RECONCILER_BACKOFF_INITIAL_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> "Settings":
        # Security settings the protocol would ignore are refused rather than dropped, so that
        # a forgotten KAFKA_SECURITY_PROTOCOL never means a plaintext connection. The messages
        # name variables, never their values.
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL"):
            if self.kafka_sasl_mechanism not in (None, *KAFKA_SASL_MECHANISMS):
                raise ValueError(
                    f"KAFKA_SASL_MECHANISM must be one of {', '.join(KAFKA_SASL_MECHANISMS)}"
                )
            missing = [
                name for name, value in (
                    ("KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                ) if not value
            ]
            if missing:
                raise ValueError(
                    f"KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}"
                )
        elif self.kafka_sasl_mechanism or self.kafka_sasl_username or self.kafka_sasl_password:
            raise ValueError(
                f"KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL is {protocol}; set SASL_SSL"
            )
        if self.kafka_ssl_cafile and "SSL" not in protocol:
            raise ValueError(
                f"KAFKA_SSL_CAFILE is set but KAFKA_SECURITY_PROTOCOL is {protocol}; set SSL or "
                f"SASL_SSL"
            )
        return self

    @property
    def group_id(self) -> str:
        return self.group_id_setting or f"{self.topic_prefix}.reconciler"

    @property
    def otlp_metrics_enabled(self) -> bool:
        """OTLP metrics as the SDK's variables ask: `otlp` named, or an endpoint given."""
        if self.otel_metrics_exporter is not None:
            return "otlp" in self.otel_metrics_exporter.split(",")
        return self.otel_exporter_otlp_endpoint is not None

    @property
    def uses_local_stack(self) -> bool:
        """True when neither Kafka nor PostgreSQL was pointed elsewhere."""
        explicit = self.model_fields_set
        return "kafka_bootstrap_servers" not in explicit and "database_url" not in explicit
