"""The HTTP order source of the contract: one request asks for one page of orders.

`fetch_page` sends `GET <url>?channel_id=…&product_id=…[&cursor=…]` with the run's headers
and returns the page, or raises `PullFailed` with a one-line reason: any status but 200, a
timeout, a connection error, a body that is not the contract's shape. It knows nothing of
Kafka, leases or cursors' storage; the pull loop puts those together.

A request the product abandons (the run is cancelled) is abandoned by closing its
connection: aiohttp releases the connection without reuse when the awaiting task is
cancelled mid-response.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Callable

import aiohttp
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import Span, SpanKind

from streams.configs import Config

log = logging.getLogger(__name__)
tracer = trace.get_tracer("reconciler.source")

MAX_BODY_BYTES = 16 * 1024 * 1024


class PullFailed(Exception):
    """A pull failed; the message says what failed, in one line."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Page:
    orders: list[dict]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class RunIdentity:
    config_id: str
    run_id: str
    fence: int


class OrderSource:
    def __init__(self, *, secrets_dir: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._secrets_dir = Path(secrets_dir) if secrets_dir else None
        self._max_body_bytes = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=True,
            raise_for_status=False,
            trace_configs=[_last_moment_check()],
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch_page(
        self,
        config: Config,
        *,
        run: RunIdentity,
        cursor: str | None,
        may_send: Callable[[], None] = lambda: None,
    ) -> Page:
        """Ask for one page. `may_send` is called once more right before the request is
        written to its connection and raises to keep it from being sent (a lease ran out
        while a connection was being set up)."""
        assert self._session is not None, "OrderSource.start() was not awaited"
        params = {"channel_id": config.channel_id, "product_id": config.product_id}
        if cursor is not None:
            params["cursor"] = cursor
        headers = {
            "X-Pull-Config-Id": run.config_id,
            "X-Pull-Run-Id": run.run_id,
            "X-Pull-Fence": str(run.fence),
            "Accept": "application/json",
        }
        authorization = self._authorization(config)
        if authorization:
            headers["Authorization"] = authorization

        timeout = config.source.timeout_seconds
        with tracer.start_as_current_span(
            "GET",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "GET",
                "url.full": config.source.url,
                "server.address": urlsplit(config.source.url).hostname or "",
                "config_id": run.config_id,
                "run_id": run.run_id,
            },
        ) as span:
            # The source sees this request's own span as the parent of whatever it does.
            carrier: dict[str, str] = {}
            inject(carrier)
            headers.update(carrier)
            body = await self._request(config, params, headers, timeout, may_send, span)
        return parse_page(body)

    async def _request(
        self,
        config: Config,
        params: dict[str, str],
        headers: dict[str, str],
        timeout: float,
        may_send: Callable[[], None],
        span: Span,
    ) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                async with self._session.get(
                    config.source.url,
                    params=params,
                    headers=headers,
                    allow_redirects=False,
                    trace_request_ctx={"may_send": may_send},
                ) as response:
                    span.set_attribute("http.response.status_code", response.status)
                    if response.status != 200:
                        raise PullFailed(
                            f"source answered HTTP {response.status}",
                            retry_after=_retry_after(response),
                        )
                    return await self._read_capped(response)
        except TimeoutError:
            raise PullFailed(f"source did not answer within {timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise PullFailed(f"could not reach the source: {_one_line(error)}") from None

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self._max_body_bytes:
                raise PullFailed(f"source body is over {self._max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _authorization(self, config: Config) -> str | None:
        auth = config.source.auth
        if auth is None:
            return None
        if self._secrets_dir is None:
            raise PullFailed(
                f"secret {auth.secret!r} is needed but RECONCILER_SECRETS_DIR is not set"
            )
        try:
            secret = (self._secrets_dir / auth.secret).read_text().strip()
        except OSError:
            raise PullFailed(f"secret {auth.secret!r} is missing from the secrets folder") from None
        if auth.type == "bearer":
            return f"Bearer {secret}"
        user, _, password = secret.partition(":")
        return aiohttp.BasicAuth(user, password).encode()


def _last_moment_check() -> aiohttp.TraceConfig:
    """A trace hook that runs `may_send` once the connection is ready, just before the
    request goes out: connecting can take long enough for a lease to run out."""

    async def check(_session: object, context: Any, _params: object) -> None:
        request_context = context.trace_request_ctx or {}
        request_context.get("may_send", lambda: None)()

    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(check)
    trace.on_connection_create_end.append(check)
    return trace


def parse_page(body: bytes) -> Page:
    """Check a 200 body against the contract's page shape."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise PullFailed("source body is not JSON") from None
    if not isinstance(data, dict):
        raise PullFailed("source body is not a JSON object")
    orders = data.get("orders")
    if not isinstance(orders, list):
        raise PullFailed("source body has no 'orders' list")
    for index, order in enumerate(orders):
        if not isinstance(order, dict):
            raise PullFailed(f"order {index} of the page is not an object")
        order_id = order.get("id")
        if isinstance(order_id, bool) or not isinstance(order_id, (str, int)) or order_id == "":
            raise PullFailed(f"order {index} of the page has no usable 'id'")
    cursor = data.get("next_cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise PullFailed("source 'next_cursor' is neither a string nor null")
    if orders and cursor is None:
        raise PullFailed("source returned orders with a null 'next_cursor'")
    return Page(orders=orders, next_cursor=cursor)


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    if response.status not in (429, 503):
        return None
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())
