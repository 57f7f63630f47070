"""How to reach the Kafka cluster: bootstrap servers and security, for aiokafka and faust.

Built from the contract's `KAFKA_*` settings by the caller; this module reads no environment.
`__repr__` leaves the password out so that a logged connection never shows it.

aiokafka reports a client that could not start only as "Unable to bootstrap from [...]" and
logs the reason (a refused connection, a certificate it does not trust, credentials the
broker refused) at a level the product silences. `connection_problem` finds that reason
again, in one line a person can act on, for the message of a command that could not start.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)


class KafkaSecurityProblem(Exception):
    """The connection's security settings cannot be used as given; one line, no secret."""


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def ssl_context(self) -> ssl.SSLContext | None:
        """A context that verifies the broker's certificate and host name, or None without TLS.

        The CA file replaces the system's trusted CAs when given. Raises KafkaSecurityProblem
        when that file cannot be read as PEM certificates.
        """
        if "SSL" not in self.security_protocol:
            return None
        try:
            return ssl.create_default_context(cafile=self.ssl_cafile)
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
            raise KafkaSecurityProblem(
                f"KAFKA_SSL_CAFILE {self.ssl_cafile} cannot be read as PEM certificates "
                f"({reason})"
            ) from None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "security_protocol": self.security_protocol,
        }
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def faust_broker(self) -> list[str]:
        return [f"kafka://{server}" for server in self.servers]

    def faust_credentials(self) -> Any:
        import faust

        context = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism or "PLAIN",
                ssl_context=context,
            )
        if context is not None:
            return faust.SSLCredentials(context)
        return None


async def connection_problem(connection: KafkaConnection, *, timeout: float) -> str | None:
    """Why a client of `connection` cannot start, as one line, or None if it can.

    Opens one connection to each bootstrap server, with the connection's security, and
    describes the first failure; a server that answers and accepts the credentials is enough.
    Takes at most about `timeout` per server. The line never holds the password.
    """
    try:
        context = connection.ssl_context()
    except KafkaSecurityProblem as problem:
        return str(problem)
    problems = []
    for server in connection.servers:
        host, _, port = server.rpartition(":")
        try:
            opened = await asyncio.wait_for(
                create_conn(
                    host.strip("[]") or server,
                    int(port or 9092),
                    request_timeout_ms=int(timeout * 1000),
                    ssl_context=context,
                    security_protocol=connection.security_protocol,
                    sasl_mechanism=connection.sasl_mechanism or "PLAIN",
                    sasl_plain_username=connection.sasl_username,
                    sasl_plain_password=connection.sasl_password,
                ),
                timeout,
            )
        except (OSError, TimeoutError, KafkaError, ValueError) as error:
            problem = _describe(error, connection, timeout=timeout)
            problems.append(f"{server}: {problem}" if len(connection.servers) > 1 else problem)
            continue
        opened.close()
        return None
    return _without_password("; ".join(problems), connection) if problems else None


def _describe(error: BaseException, connection: KafkaConnection, *, timeout: float) -> str:
    """What went wrong on one connection, and which setting to look at."""
    protocol = connection.security_protocol
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"the broker's TLS certificate is not trusted ({error.verify_message}); "
            f"KAFKA_SSL_CAFILE must name the CA that signed it"
        )
    if isinstance(error, ssl.SSLError):
        return f"the TLS handshake failed ({error.reason or error}); is it a {protocol} listener?"
    if isinstance(error, SaslAuthenticationFailed):
        return (
            f"the broker refused {connection.sasl_mechanism or 'PLAIN'} authentication as "
            f"{connection.sasl_username!r} ({_one_line(error)}); check KAFKA_SASL_USERNAME "
            f"and KAFKA_SASL_PASSWORD"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return f"{_one_line(error)}; check KAFKA_SASL_MECHANISM"
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:.0f} s; is it a {protocol} listener?"
    if isinstance(error, (ConnectionResetError, KafkaConnectionError)):
        # What a listener of another protocol does with the first bytes it cannot read.
        return f"the broker closed the connection; is it a {protocol} listener?"
    if isinstance(error, OSError) and error.errno:
        # asyncio's own text ("Connect call failed (…)") hides the reason the system gave.
        return os.strerror(error.errno).lower()
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    # aiokafka prefixes broker errors with their code: "[Error 58] SaslAuthenticationFailed: …"
    return text.split(": ", 1)[1] if text.startswith("[Error ") and ": " in text else text


def _without_password(text: str, connection: KafkaConnection) -> str:
    # No message of aiokafka or of the broker is known to repeat it; this keeps it that way.
    password = connection.sasl_password
    return text.replace(password, "***") if password else text
