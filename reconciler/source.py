"""The HTTP order source of the contract: one request asks for one page of orders.

`fetch_page` sends `GET <url>?channel_id=…&product_id=…[&cursor=…]` with the run's headers
and returns the page, or raises `PullFailed` with a one-line reason: any status but 200, a
timeout, a refused address, a connection error, a body that is not the contract's shape. It
knows nothing of Kafka, leases or cursors' storage; the pull loop puts those together.

Every byte that comes back is untrusted, and so is every address a source's name resolves
to. The rules, each enforced here:

- Where: the URL's host must be allowed, and every address is checked by the
  `reconciler.addresses` policy just before a socket connects to it, so a name that
  resolves to a metadata address at connect time is refused like the address itself.
  Redirects are not followed; a 3xx is a failed pull that says where it pointed.
- Credentials: read from RECONCILER_SECRETS_DIR, cached until the file changes. No secret
  value reaches an error text (text from the source is scrubbed of them), and an answer
  that carries one back is refused, so none reaches a record, the table or a span.
- Politeness: at most `max_requests_per_host` requests at a time to one host; the wait for
  a turn counts against the request's timeout. 429 and 503 pass on `Retry-After`, in
  seconds or as an HTTP date, for the backoff to honour.
- Answers: the body is capped (also after decompression), and the whole request, slow body
  included, is bounded by the config's timeout. `parse_page` checks the shape; `PagingGuard`
  stops a pull whose cursor stops advancing or that pages past a cap, and drops orders the
  pull already had.

A request the product abandons (the run is cancelled) is abandoned by closing its
connection: aiohttp releases the connection without reuse when the awaiting task is
cancelled mid-response.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import ipaddress
import json
import logging
import math
import re
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable
from urllib.parse import quote, urlsplit

import aiohttp
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import Span, SpanKind

from streams.configs import Config
from reconciler.addresses import AddressPolicy, AddressRefused, parse_hosts, parse_networks

if TYPE_CHECKING:
    from reconciler.settings import Settings

log = logging.getLogger(__name__)
tracer = trace.get_tracer("reconciler.source")

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_REQUESTS_PER_HOST = 8
MAX_PAGES_PER_PULL = 1000
# Kafka keys are `<channel_id>:<order id>`; a longer id is not an id.
MAX_ORDER_ID_CHARS = 512
# The cursor goes back to the source in the query string and into the table.
MAX_CURSOR_CHARS = 4096
# How much of a text from the source (a redirect's target, a parser's complaint) an error shows.
MAX_SHOWN_CHARS = 200
# Shorter pieces of a secret are not looked for in text: they would match ordinary words.
# Limitation: a secret shorter than this is neither scrubbed from errors nor refused in answers.
MIN_SECRET_PIECE_CHARS = 4
DNS_CACHE_SECONDS = 30.0

# The addresses the socket factory refused or let through during the current request.
_connect_attempts: contextvars.ContextVar[list[tuple[str, str | None]] | None] = (
    contextvars.ContextVar("connect_attempts", default=None)
)
# A JSON escape of a UTF-16 surrogate: only then can a parsed string hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_DELAY_SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")


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
    """The client side of every config's source, shared by all loops of an instance.

    `policy` decides where requests may go; `max_body_bytes` caps one answer's body after
    decompression; `max_requests_per_host` caps requests in flight to one host name;
    `max_pages_per_pull` is read by the pull loop (see `PagingGuard`).
    """

    def __init__(
        self,
        *,
        secrets_dir: str | None,
        policy: AddressPolicy | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_requests_per_host: int = MAX_REQUESTS_PER_HOST,
        max_pages_per_pull: int = MAX_PAGES_PER_PULL,
        dns_cache_seconds: float | None = DNS_CACHE_SECONDS,
    ) -> None:
        self._secrets = SecretFiles(Path(secrets_dir) if secrets_dir else None)
        self._policy = policy if policy is not None else AddressPolicy()
        self._max_body_bytes = max_body_bytes
        self._slots = HostSlots(max_requests_per_host)
        self.max_pages_per_pull = max_pages_per_pull
        self._dns_cache_seconds = dns_cache_seconds
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OrderSource:
        policy = AddressPolicy(
            allowed_hosts=parse_hosts(settings.source_allowed_hosts,
                                      setting="RECONCILER_SOURCE_ALLOWED_HOSTS"),
            allowed_networks=parse_networks(settings.source_allowed_networks,
                                            setting="RECONCILER_SOURCE_ALLOWED_NETWORKS"),
            refused_networks=parse_networks(settings.source_refused_networks,
                                            setting="RECONCILER_SOURCE_REFUSED_NETWORKS"),
        )
        return cls(
            secrets_dir=settings.secrets_dir,
            policy=policy,
            max_body_bytes=settings.source_max_body_bytes,
            max_requests_per_host=settings.source_max_requests_per_host,
            max_pages_per_pull=settings.source_max_pages_per_pull,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,  # `HostSlots` caps requests per host name instead
            use_dns_cache=self._dns_cache_seconds is not None,
            ttl_dns_cache=self._dns_cache_seconds,
            socket_factory=_policed_socket_factory(self._policy),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # no proxy from the environment: the policy sees real addresses
            # No cookies: one config's source must not plant state in another's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
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
        host = urlsplit(config.source.url).hostname or ""
        refusal = self._policy.host_refusal(host)
        if refusal is not None:
            raise PullFailed(refusal)

        params = {"channel_id": config.channel_id, "product_id": config.product_id}
        if cursor is not None:
            params["cursor"] = cursor
        headers = {
            "X-Pull-Config-Id": run.config_id,
            "X-Pull-Run-Id": run.run_id,
            "X-Pull-Fence": str(run.fence),
            "Accept": "application/json",
        }
        auth = config.source.auth
        secret_pieces: tuple[str, ...] = ()
        if auth is not None:
            secret = self._secrets.read(auth.secret)
            headers["Authorization"] = _authorization(auth.type, auth.secret, secret)
            secret_pieces = _secret_pieces(auth.type, secret)

        with tracer.start_as_current_span(
            "GET",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "GET",
                "url.full": config.source.url,
                "server.address": host,
                "config_id": run.config_id,
                "run_id": run.run_id,
            },
        ) as span:
            # The source sees this request's own span as the parent of whatever it does.
            carrier: dict[str, str] = {}
            inject(carrier)
            headers.update(carrier)
            try:
                body = await self._request(config, host, params, headers, may_send, span)
            except PullFailed as failed:
                # The texts were scrubbed where they were cut to length; this is the net
                # under that, for any text a future change forgets to pass through `shown`.
                scrubbed = self._secrets.scrub(str(failed))
                raise PullFailed(scrubbed, retry_after=failed.retry_after) from None
        name = auth.secret if auth else ""
        _refuse_echoed_secret(body, secret_pieces, name)
        page = parse_page(body)
        if secret_pieces and b"\\" in body:
            # JSON escapes can spell a secret that the raw bytes do not show.
            parsed = json.dumps([page.orders, page.next_cursor], ensure_ascii=False)
            _refuse_echoed_secret(parsed.encode("utf-8"), secret_pieces, name)
        return page

    async def _request(
        self,
        config: Config,
        host: str,
        params: dict[str, str],
        headers: dict[str, str],
        may_send: Callable[[], None],
        span: Span,
    ) -> bytes:
        timeout = config.source.timeout_seconds
        attempts: list[tuple[str, str | None]] = []
        token = _connect_attempts.set(attempts)
        waiting_for_slot = True
        try:
            async with asyncio.timeout(timeout):
                async with self._slots.slot(_host_and_port(config.source.url)):
                    waiting_for_slot = False
                    async with self._session.get(
                        config.source.url,
                        params=params,
                        headers=headers,
                        allow_redirects=False,
                        trace_request_ctx={"may_send": may_send},
                    ) as response:
                        span.set_attribute("http.response.status_code", response.status)
                        if response.status != 200:
                            raise _status_failure(response, self._secrets.scrub)
                        return await self._read_capped(response)
        except TimeoutError:
            if waiting_for_slot:
                raise PullFailed(
                    f"source host {host} had all {self._slots.limit} request slots busy for "
                    f"{timeout:g} s (RECONCILER_SOURCE_MAX_REQUESTS_PER_HOST): too many "
                    f"configs pull from it at once, or it answers slowly"
                ) from None
            raise PullFailed(f"source did not answer within {timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise _client_failure(error, host, attempts, self._secrets.scrub) from None
        finally:
            _connect_attempts.reset(token)

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self._max_body_bytes
        if response.content_length is not None and response.content_length > cap:
            raise PullFailed(f"source body is {response.content_length} bytes, over the "
                             f"{cap}-byte limit (RECONCILER_SOURCE_MAX_BODY_BYTES)")
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > cap:
                raise PullFailed(f"source body is over the {cap}-byte limit "
                                 f"(RECONCILER_SOURCE_MAX_BODY_BYTES)")
            chunks.append(chunk)
        return b"".join(chunks)


class SecretFiles:
    """The files of RECONCILER_SECRETS_DIR, each read when first needed and again whenever
    it changes: a new modification time, size or inode (a rotated secret, including a
    mounted folder whose symlink was swapped). A stat per request, no read."""

    def __init__(self, folder: Path | None) -> None:
        self._folder = folder
        # name → (what the file looked like, its value)
        self._cache: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def read(self, name: str) -> str:
        if self._folder is None:
            raise PullFailed(f"source.auth names secret {name!r}, but RECONCILER_SECRETS_DIR "
                             f"is not set")
        path = self._folder / name
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            raw = path.read_bytes()
        except FileNotFoundError:
            raise PullFailed(f"secret {name!r} is missing: there is no file {name!r} in "
                             f"RECONCILER_SECRETS_DIR ({self._folder})") from None
        except OSError as error:
            raise PullFailed(f"secret {name!r} could not be read from RECONCILER_SECRETS_DIR "
                             f"({self._folder}): {error.strerror or type(error).__name__}"
                             ) from None
        # The messages below never quote the content: it is the secret.
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PullFailed(f"secret {name!r} is not UTF-8 text") from None
        if not value:
            raise PullFailed(f"secret {name!r} is an empty file")
        if not value.isprintable():
            raise PullFailed(f"secret {name!r} holds a line break or another control "
                             f"character, which cannot go into a header")
        self._cache[name] = (stamp, value)
        return value

    def scrub(self, text: str) -> str:
        """`text` with every piece of every secret read so far replaced by `***`."""
        pieces: set[str] = set()
        for _stamp, value in self._cache.values():
            # Pieces as either kind of auth cuts them: a few harmless extra ones.
            pieces.update(_secret_pieces("basic", value), _secret_pieces("bearer", value))
        for piece in sorted(pieces, key=len, reverse=True):
            text = text.replace(piece, "***")
        return text


class HostSlots:
    """At most `limit` requests at a time per host name. A host's entry lives only while
    a request holds or awaits one of its slots, so hosts of configs long gone cost nothing."""

    @dataclass(slots=True)
    class _Host:
        semaphore: asyncio.Semaphore
        users: int = 0

    # Limitation: the cap is per instance; N instances may send N times as many to one host.
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._hosts: dict[str, HostSlots._Host] = {}

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        entry = self._hosts.get(host)
        if entry is None:
            entry = self._hosts[host] = HostSlots._Host(asyncio.Semaphore(self.limit))
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._hosts[host]


class PagingGuard:
    """What one pull has seen of the source's pages, so that a source cannot page forever.

    `admit` is called for each page with orders, before anything of it is published. It
    raises `PullFailed` when the page's cursor repeats one this pull already sent or
    received (the next request would ask for what was asked before, for ever), or when the
    pull has gone past `max_pages` pages with orders; it returns the page without the orders
    whose key the pull already had, so an order that a source repeats within one pull is
    published once.
    """

    def __init__(self, *, cursor: str | None, channel_id: str, max_pages: int) -> None:
        self._cursors = {cursor} if cursor is not None else set()
        self._channel_id = channel_id
        self._max_pages = max_pages
        self._keys: set[str] = set()
        self.pages = 0

    def admit(self, page: Page) -> Page:
        self.pages += 1
        if page.next_cursor in self._cursors:
            raise PullFailed(
                f"source's next_cursor did not advance: page {self.pages} of this pull has "
                f"{len(page.orders)} orders and a cursor this pull already used; paging "
                f"stopped and nothing of that page was published"
            )
        # Limitation: a backlog deeper than the cap fails every capped pull, so it drains
        # with a backoff between runs.
        if self.pages > self._max_pages:
            raise PullFailed(
                f"source still had orders after {self._max_pages} pages in one pull "
                f"(RECONCILER_SOURCE_MAX_PAGES_PER_PULL); paging stopped, and the next run "
                f"goes on from the saved cursor"
            )
        assert page.next_cursor is not None  # parse_page refuses orders without a cursor
        self._cursors.add(page.next_cursor)
        fresh = []
        for order in page.orders:
            key = order_key(self._channel_id, order)
            if key not in self._keys:
                self._keys.add(key)
                fresh.append(order)
        return Page(orders=fresh, next_cursor=page.next_cursor)


def order_key(channel_id: str, order: dict) -> str:
    """The Kafka key of an order, as the loop publishes it: the deduplication key."""
    return f"{channel_id}:{order['id']}"


def parse_page(body: bytes) -> Page:
    """Check a 200 body against the contract's page shape.

    Beyond the shape, what the product could not pass on is refused too: NaN, infinities
    and lone UTF-16 surrogates (re-serialised orders would not be JSON or not UTF-8),
    cursors with NUL characters (PostgreSQL cannot store them) and over-long ids and cursors.
    """
    try:
        # UTF-8 only, strictly: Python's own decoding of JSON bytes lets through encoded
        # lone surrogates, which no key or cursor can be written with.
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PullFailed("source body is not JSON: it is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NotFinite as error:
        raise PullFailed(f"source body holds {error}, which JSON has no number for") from None
    except (ValueError, RecursionError):
        raise PullFailed(_why_not_read(text)) from None
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
            raise PullFailed(f"order {index} of the page has no usable 'id' "
                             f"(a non-empty string or an integer)")
        if len(str(order_id)) > MAX_ORDER_ID_CHARS:
            raise PullFailed(f"order {index} of the page has an 'id' longer than "
                             f"{MAX_ORDER_ID_CHARS} characters")
    cursor = data.get("next_cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise PullFailed("source 'next_cursor' is neither a string nor null")
    if orders and cursor is None:
        raise PullFailed("source returned orders with a null 'next_cursor'")
    if cursor is not None and len(cursor) > MAX_CURSOR_CHARS:
        raise PullFailed(f"source 'next_cursor' is longer than {MAX_CURSOR_CHARS} characters")
    if cursor is not None and "\x00" in cursor:
        raise PullFailed("source 'next_cursor' holds a NUL character")
    if _SURROGATE_ESCAPE.search(body) and not _is_valid_unicode(data):
        raise PullFailed("source body holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                         "which is not text")
    return Page(orders=orders, next_cursor=cursor)


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait by a `Retry-After` value: delay seconds (`120`, also `1.5`) or an
    HTTP date (IMF-fixdate, RFC 850 or asctime, in GMT). A date in the past is 0; anything
    else is None (ignored)."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    if not value or len(value) > 64 or not value[0].isalpha():
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # HTTP dates are always GMT
    return max(0.0, (when - now).total_seconds())


def _status_failure(
    response: aiohttp.ClientResponse, scrub: Callable[[str], str]
) -> PullFailed:
    status = response.status
    if 300 <= status < 400:
        location = response.headers.get("Location")
        where = (f"a redirect to {shown(location, scrub=scrub)}" if location
                 else "a redirect without a Location")
        return PullFailed(f"source answered HTTP {status}, {where}; redirects are not "
                          f"followed: point source.url at where the source is")
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("Retry-After"),
                                        now=datetime.now(timezone.utc))
    if retry_after is not None:
        return PullFailed(f"source answered HTTP {status} and asked to wait "
                          f"{retry_after:.0f} s (Retry-After)", retry_after=retry_after)
    return PullFailed(f"source answered HTTP {status}")


def _client_failure(
    error: aiohttp.ClientError,
    host: str,
    attempts: list[tuple[str, str | None]],
    scrub: Callable[[str], str],
) -> PullFailed:
    # aiohttp tries the addresses left after a failure again, so one may come twice.
    refused = dict((address, reason) for address, reason in attempts if reason is not None)
    if refused and all(reason is not None for _address, reason in attempts):
        address, reason = next(iter(refused.items()))
        where = host if _same_address(address, host) else f"{address}, an address of {host}"
        text = f"refused to connect to {where}: {reason}"
        if len(refused) > 1:
            text += f" ({len(refused) - 1} more addresses of {host} were refused too)"
        return PullFailed(text)
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return PullFailed(f"could not resolve the source host {host}: "
                          f"{shown(str(error), scrub=scrub)}")
    if isinstance(error, aiohttp.ClientConnectorError):
        return PullFailed(f"could not connect to the source: {shown(str(error), scrub=scrub)}")
    return PullFailed(f"source's answer could not be read: {shown(str(error), scrub=scrub)}")


def _same_address(address: str, host: str) -> bool:
    """Whether a socket address is the URL's host written as an address, perhaps in
    another notation (`::ffff:a9fe:a9fe` for `::ffff:169.254.169.254`)."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]) == ipaddress.ip_address(host)
    except ValueError:
        return False


def _policed_socket_factory(policy: AddressPolicy) -> Callable[[tuple], socket.socket]:
    """aiohttp's socket factory, called with the very address a socket is about to connect
    to, after any name was resolved: the one place where every connection passes."""

    def create(addr_info: tuple) -> socket.socket:
        family, type_, proto, _name, sockaddr = addr_info
        address = str(sockaddr[0])
        reason = policy.address_refusal(address)
        attempts = _connect_attempts.get()
        if attempts is not None:
            attempts.append((address, reason))
        if reason is not None:
            raise AddressRefused(f"refused to connect to {address}: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)

    return create


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


def _authorization(kind: str, name: str, secret: str) -> str:
    if kind == "bearer":
        return f"Bearer {secret}"
    user, colon, password = secret.partition(":")
    if not colon:
        raise PullFailed(f"secret {name!r} is for basic auth and must hold user:password")
    return aiohttp.encode_basic_auth(user, password, encoding="utf-8")


def _secret_pieces(kind: str, secret: str) -> tuple[str, ...]:
    """What of a secret may show up in text: the secret, for basic auth the password, the
    base64 forms (standard and URL-safe, without padding, so that a percent-encoded `=`
    does not hide them) of the secret and of the header value, and the percent-encoded
    forms of all of those.

    A source that re-encodes a secret any other way, or splits it, is not caught."""
    plain = [secret]
    if kind == "basic":
        _user, _colon, password = secret.partition(":")
        plain.append(password)
        header_values = [secret]
    else:
        header_values = [secret, f"Bearer {secret}"]
    encoded = []
    for value in header_values:
        raw = value.encode("utf-8")
        for form in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
            encoded.append(form.decode("ascii").rstrip("="))
    pieces = plain + encoded
    pieces += [quote(piece, safe="") for piece in pieces]
    return tuple(dict.fromkeys(p for p in pieces if len(p) >= MIN_SECRET_PIECE_CHARS))


def _host_and_port(url: str) -> str:
    """What the per-host cap counts by: two ports of one host are two sources."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _refuse_echoed_secret(body: bytes, pieces: tuple[str, ...], name: str) -> None:
    """A source that sends the credential back would have it published with its orders or
    saved as a cursor; such an answer is refused whole."""
    for piece in pieces:
        if piece.encode("utf-8") in body:
            raise PullFailed(f"source's answer holds the value of secret {name!r} that was "
                             f"sent with the request; nothing of it is published")


def shown(text: str, *, scrub: Callable[[str], str] = lambda text: text) -> str:
    """Text from outside, fit for an error message: printable, one line, bounded, and
    scrubbed of secrets before and after it is made printable, and before it is cut, so
    that neither a control character inside a secret nor the cut leaves part of one."""
    text = scrub(text)
    text = scrub(" ".join("".join(c if c.isprintable() else " " for c in text).split()))
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 1] + "…"
    return text


class _NotFinite(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite("a number too large for a double")
    return value


class _TooManyDigits(ValueError):
    pass


def _why_not_read(body: str) -> str:
    """Why a body the parser refused was refused. Only here, off the path of bodies that
    parse, is every integer looked at in Python: one of more digits than Python reads is
    valid JSON, and is named as such."""
    try:
        json.loads(body, parse_int=_bounded_int)
    except _TooManyDigits as error:
        return f"source body holds {error}"
    except (ValueError, RecursionError):
        pass
    return "source body is not JSON"


def _bounded_int(text: str) -> int:
    # Python reads integers of at most `sys.get_int_max_str_digits()` digits (4300).
    digits = len(text.lstrip("-"))
    limit = sys.get_int_max_str_digits()
    if limit and digits > limit:
        raise _TooManyDigits(f"an integer of {digits} digits, more than the {limit} the "
                             "product reads")
    return int(text)


def _is_valid_unicode(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
