"""Settings that cannot work are refused when read, naming the variable, not the value's
secret parts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from reconciler.settings import Settings


@pytest.mark.parametrize("servers", ["127.0.0.1:9092", "localhost", "a:1, b:2", "[::1]:9092"])
def test_bootstrap_servers_of_host_and_port_are_taken(servers, monkeypatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", servers)
    assert Settings().kafka_bootstrap_servers == servers


@pytest.mark.parametrize("servers", ["not a host", "broker:", ":9092", "broker:99999",
                                     "broker:9092,", ""])
def test_bootstrap_servers_that_name_no_broker_are_refused(servers, monkeypatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", servers)
    with pytest.raises(ValidationError, match="KAFKA_BOOTSTRAP_SERVERS must be host"):
        Settings()


@pytest.mark.parametrize(("name", "value"), [
    ("RECONCILER_KAFKA_SESSION_TIMEOUT_SECONDS", "3"),
    ("RECONCILER_KAFKA_SESSION_TIMEOUT_SECONDS", "-1"),
    ("RECONCILER_LEASE_SECONDS", "inf"),
    ("RECONCILER_BACKOFF_MAX_SECONDS", "nan"),
    ("RECONCILER_LOG_LEVEL", "LOUD"),
    ("RECONCILER_TOPIC_PREFIX", "p" * 238),
    ("RECONCILER_BACKOFF_MAX_SECONDS", "0.001"),
    ("RECONCILER_INSTANCE_ID", ""),
    ("RECONCILER_INSTANCE_ID", "two words"),
    ("RECONCILER_LEASE_SECONDS", "1000"),
    ("RECONCILER_LEASE_SECONDS", "1e300"),
    ("RECONCILER_KAFKA_HEARTBEAT_SECONDS", "60"),
])
def test_settings_that_cannot_work_are_refused_naming_the_variable(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    assert name in str(error.value)


def test_a_log_level_is_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_LOG_LEVEL", "debug")
    assert Settings().log_level == "DEBUG"
