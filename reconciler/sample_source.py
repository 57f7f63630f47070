"""A sample HTTP order source: the far side of the contract's pulls, for the demo and tests.

It answers `GET /orders?channel_id=…&product_id=…[&cursor=…]` with pages of made-up orders.
Orders appear at a steady rate per (channel, product): order number i (1, 2, …) exists from
`t0 + i / rate` on, where t0 is when the server started, so what a page holds depends only
on the clock and the cursor. An order's id is `<channel_id>-<product_id>-<i>`, which makes
duplicates and gaps easy to check. The cursor is the number of the last order delivered;
a page holds up to `page_size` orders after it that exist by now, and `next_cursor` is the
last number on the page, or for an empty page the cursor that was asked with (null when
none was).

Every request is recorded with its run headers (`X-Pull-Config-Id`, `X-Pull-Run-Id`,
`X-Pull-Fence`) and its start and end on the monotonic clock, so a test can check that two
runs of one config never pulled at the same time (`overlaps`). A request whose client hangs
up before the answer is recorded with status 499 when the hang-up is noticed.

Failures can be injected per product or for every product: `fail` answers a status,
`hang` holds the request until `heal`, `delay` answers late. A rule for a product wins
over the rule for all; a new rule for the same target replaces the old one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)

# Status recorded for a request whose client closed the connection before the answer.
CLIENT_CLOSED = 499
CURRENCIES = ("EUR", "USD", "GBP", "CHF")
# How long `stop` lets requests being answered finish before cancelling them.
STOP_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request; times are the source's clock (`time.monotonic()` by default)."""

    config_id: str | None
    run_id: str | None
    fence: int | None
    channel_id: str | None
    product_id: str | None
    cursor: str | None
    started: float
    ended: float
    status: int
    traceparent: str | None = None
    authorization: str | None = field(default=None, repr=False)
    orders: int = 0

    @property
    def has_traceparent(self) -> bool:
        return self.traceparent is not None

    @property
    def has_authorization(self) -> bool:
        return self.authorization is not None


@dataclass(slots=True)
class _Rule:
    """One injected failure: a status to answer, a hang, or a delay."""

    kind: str  # "fail", "hang" or "delay"
    status: int = 500
    times: int | None = None
    retry_after: float | None = None
    seconds: float = 0.0
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _InFlight:
    config_id: str | None
    run_id: str | None
    started: float


class SampleSource:
    """The sample order source on `host:port` (port 0 picks a free one).

    Arguments:
        host: address to listen on; loopback by default.
        port: TCP port; 0 (the default) lets the system choose, see `url` after `start`.
        rate: orders per second that appear for each (channel, product); default 2.0.
        page_size: most orders in one page; default 50.
        clock: the monotonic clock that decides which orders exist and stamps the records;
            tests pass their own to page through a known number of orders without waiting.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float = 2.0,
        page_size: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be a positive number of orders per second")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.host = host
        self.port = port
        self.rate = rate
        self.page_size = page_size
        self._clock = clock
        self._t0 = clock()
        self._t0_wall = time.time()
        self._records: list[RequestRecord] = []
        self._in_flight: dict[int, _InFlight] = {}
        self._served: dict[tuple[str, str], int] = {}
        self._rules: dict[str | None, _Rule] = {}
        self._runner: web.AppRunner | None = None

    # ---- running -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/orders", self._orders)
        # Cancelling the handler when the client hangs up is what lets the record show when
        # an abandoned request really ended.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=STOP_SECONDS
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._t0 = self._clock()
        self._t0_wall = time.time()
        log.info("sample order source listening on %s", self.url)

    async def stop(self) -> None:
        for rule in self._rules.values():
            rule.released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/orders"

    # ---- failure injection ---------------------------------------------------------------

    def fail(
        self,
        product_id: str | None = None,
        status: int = 500,
        times: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer `status` (with `Retry-After` when given), `times` times or until `heal`."""
        self._set_rule(product_id, _Rule("fail", status=status, times=times,
                                         retry_after=retry_after))

    def hang(self, product_id: str | None = None) -> None:
        """Accept requests and answer none of them until `heal`; then answer normally."""
        self._set_rule(product_id, _Rule("hang"))

    def delay(self, product_id: str | None = None, *, seconds: float) -> None:
        """Answer every request `seconds` late."""
        self._set_rule(product_id, _Rule("delay", seconds=seconds))

    def heal(self, product_id: str | None = None) -> None:
        """Remove the rule for `product_id`; without one, remove every rule."""
        targets = list(self._rules) if product_id is None else [product_id]
        for target in targets:
            rule = self._rules.pop(target, None)
            if rule is not None:
                rule.released.set()

    def _set_rule(self, product_id: str | None, rule: _Rule) -> None:
        old = self._rules.get(product_id)
        if old is not None:
            old.released.set()
        self._rules[product_id] = rule

    def _rule_for(self, product_id: str | None) -> _Rule | None:
        return self._rules.get(product_id) or self._rules.get(None)

    # ---- what was asked ------------------------------------------------------------------

    def requests(self) -> list[RequestRecord]:
        """Every finished request, in the order they ended."""
        return list(self._records)

    def requests_for(self, config_id: str) -> list[RequestRecord]:
        """The finished requests of one config, in the order they started."""
        return sorted(
            (r for r in self._records if r.config_id == config_id), key=lambda r: r.started
        )

    def in_flight(self) -> int:
        """How many requests are being answered (or held) right now."""
        return len(self._in_flight)

    def orders_served_for(self, channel_id: str, product_id: str) -> int:
        """Orders delivered in 200 answers for (channel, product), repeats included."""
        return self._served.get((channel_id, product_id), 0)

    def overlaps(self) -> list[tuple[str, str, str]]:
        """Pairs of runs of one config whose requests interleave in time.

        A run spans from the start of its first request to the end of its last one (now,
        for a request still in flight); two runs of a config overlap when their spans
        intersect. Each pair comes once as (config_id, earlier run, later run).
        """
        spans: dict[str, dict[str, list[float]]] = {}
        now = self._clock()
        requests = [(r.config_id, r.run_id, r.started, r.ended) for r in self._records]
        requests += [(f.config_id, f.run_id, f.started, now) for f in self._in_flight.values()]
        for config_id, run_id, started, ended in requests:
            if config_id is None or run_id is None:
                continue
            span = spans.setdefault(config_id, {}).setdefault(run_id, [started, ended])
            span[0] = min(span[0], started)
            span[1] = max(span[1], ended)

        found = []
        for config_id, runs in sorted(spans.items()):
            ordered = sorted(runs.items(), key=lambda item: item[1][0])
            for index, (run_a, (_, end_a)) in enumerate(ordered):
                for run_b, (start_b, _) in ordered[index + 1:]:
                    if start_b < end_a:
                        found.append((config_id, run_a, run_b))
        return found

    # ---- answering -----------------------------------------------------------------------

    async def _orders(self, request: web.Request) -> web.Response:
        started = self._clock()
        headers = request.headers
        query = request.query
        config_id = headers.get("X-Pull-Config-Id")
        run_id = headers.get("X-Pull-Run-Id")
        channel_id = query.get("channel_id")
        product_id = query.get("product_id")
        cursor = query.get("cursor")
        key = id(request)
        self._in_flight[key] = _InFlight(config_id, run_id, started)
        status = 500  # what aiohttp answers when the handler raises
        delivered = 0
        try:
            response, delivered = await self._answer(channel_id, product_id, cursor)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            self._in_flight.pop(key, None)
            if status == 200 and channel_id is not None and product_id is not None:
                pair = (channel_id, product_id)
                self._served[pair] = self._served.get(pair, 0) + delivered
            self._records.append(
                RequestRecord(
                    config_id=config_id,
                    run_id=run_id,
                    fence=_int_or_none(headers.get("X-Pull-Fence")),
                    channel_id=channel_id,
                    product_id=product_id,
                    cursor=cursor,
                    started=started,
                    ended=self._clock(),
                    status=status,
                    traceparent=headers.get("traceparent"),
                    authorization=headers.get("Authorization"),
                    orders=delivered,
                )
            )

    async def _answer(
        self, channel_id: str | None, product_id: str | None, cursor: str | None
    ) -> tuple[web.Response, int]:
        if not channel_id or not product_id:
            return _error(400, "channel_id and product_id are required"), 0
        after = _cursor_number(cursor)
        if after is None:
            return _error(400, f"cursor must be a whole number of at least 0, got {cursor!r}"), 0

        refusal = await self._apply_rule(product_id)
        if refusal is not None:
            return refusal, 0

        last = min(self._orders_existing(), after + self.page_size)
        orders = [self._order(channel_id, product_id, i) for i in range(after + 1, last + 1)]
        next_cursor = str(last) if orders else cursor
        return web.json_response({"orders": orders, "next_cursor": next_cursor}), len(orders)

    async def _apply_rule(self, product_id: str) -> web.Response | None:
        """Carry out the failure rule in force, if any; a response means answer with it."""
        rule = self._rule_for(product_id)
        if rule is None:
            return None
        if rule.kind == "hang":
            await rule.released.wait()
            return None
        if rule.kind == "delay":
            await asyncio.sleep(rule.seconds)
            return None
        if rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                self._drop_rule(rule)
        response = _error(rule.status, f"injected failure: HTTP {rule.status}")
        if rule.retry_after is not None:
            response.headers["Retry-After"] = f"{rule.retry_after:g}"
        return response

    def _drop_rule(self, rule: _Rule) -> None:
        for target, held in list(self._rules.items()):
            if held is rule:
                del self._rules[target]

    def _orders_existing(self) -> int:
        return math.floor((self._clock() - self._t0) * self.rate)

    def _order(self, channel_id: str, product_id: str, number: int) -> dict:
        order_id = f"{channel_id}-{product_id}-{number}"
        created = self._t0_wall + number / self.rate
        checksum = zlib.crc32(order_id.encode())
        return {
            "id": order_id,
            "channel_id": channel_id,
            "product_id": product_id,
            "quantity": 1 + checksum % 3,
            "amount": round(5 + (checksum % 19_500) / 100, 2),
            "currency": CURRENCIES[zlib.crc32(channel_id.encode()) % len(CURRENCIES)],
            "created_at": dt.datetime.fromtimestamp(created, dt.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }


async def serve_forever(host: str = "127.0.0.1", port: int = 8081, rate: float = 2.0) -> None:
    """Run a SampleSource until cancelled (the `reconciler sample-source` command)."""
    source = SampleSource(host=host, port=port, rate=rate)
    await source.start()
    try:
        await asyncio.Event().wait()
    finally:
        await source.stop()


def _cursor_number(cursor: str | None) -> int | None:
    if cursor is None:
        return 0
    if not cursor.isascii() or not cursor.isdigit():
        return None
    return int(cursor)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
