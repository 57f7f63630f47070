"""The sample order source: paging by cursor, what it records, overlaps, injected failures.

Each test starts the source on a free loopback port; no broker or database is involved.
Paging tests drive the source's clock by hand, so the number of orders in existence is
known exactly.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from reconciler.sample_source import CLIENT_CLOSED, SampleSource


class ManualClock:
    """Moves on only when a test says so, plus a millisecond per reading so that the
    records of requests sent one after another never share a time stamp."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@pytest.fixture
async def clock():
    return ManualClock()


@pytest.fixture
async def source(clock):
    # 2 orders per second; pages of 5, so a dozen orders take three pages.
    server = SampleSource(rate=2.0, page_size=5, clock=clock)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def live_source():
    server = SampleSource(rate=50.0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def get_page(
    http: aiohttp.ClientSession,
    source: SampleSource,
    *,
    channel: str = "shop-1",
    product: str = "sku-1",
    cursor: str | None = None,
    config_id: str = "shop-1.sku-1",
    run_id: str = "run-a",
    fence: int = 1,
) -> tuple[int, dict]:
    params = {"channel_id": channel, "product_id": product}
    if cursor is not None:
        params["cursor"] = cursor
    headers = {"X-Pull-Config-Id": config_id, "X-Pull-Run-Id": run_id, "X-Pull-Fence": str(fence)}
    async with http.get(source.url, params=params, headers=headers) as response:
        return response.status, await response.json()


async def test_pages_follow_the_cursor_until_an_empty_page(source, clock, http):
    clock.now += 6.0  # 12 orders exist at 2 per second

    pages = []
    cursor = None
    while True:
        status, body = await get_page(http, source, cursor=cursor)
        assert status == 200
        pages.append([order["id"] for order in body["orders"]])
        if not body["orders"]:
            break
        cursor = body["next_cursor"]

    assert [len(page) for page in pages] == [5, 5, 2, 0]
    assert pages[0][0] == "shop-1-sku-1-1"
    assert pages[2][-1] == "shop-1-sku-1-12"
    assert cursor == "12"


async def test_orders_carry_their_channel_product_and_plausible_fields(source, clock, http):
    clock.now += 1.0

    _, body = await get_page(http, source, channel="shop-2", product="sku-9")

    order = body["orders"][0]
    assert order["id"] == "shop-2-sku-9-1"
    assert order["channel_id"] == "shop-2" and order["product_id"] == "sku-9"
    assert order["amount"] > 0 and order["currency"] in ("EUR", "USD", "GBP", "CHF")
    assert order["created_at"].endswith("Z")


async def test_new_orders_appear_after_the_saved_cursor_as_time_passes(source, clock, http):
    clock.now += 1.0
    _, first = await get_page(http, source)
    clock.now += 1.5

    _, second = await get_page(http, source, cursor=first["next_cursor"])

    assert [o["id"] for o in first["orders"]] == ["shop-1-sku-1-1", "shop-1-sku-1-2"]
    assert [o["id"] for o in second["orders"]] == ["shop-1-sku-1-3", "shop-1-sku-1-4",
                                                   "shop-1-sku-1-5"]
    assert second["next_cursor"] == "5"


async def test_an_empty_page_repeats_the_cursor_asked_with(source, http):
    _, without_cursor = await get_page(http, source)
    _, with_cursor = await get_page(http, source, cursor="7")

    assert without_cursor == {"orders": [], "next_cursor": None}
    assert with_cursor == {"orders": [], "next_cursor": "7"}


async def test_a_cursor_that_is_not_a_number_is_refused(source, http):
    status, body = await get_page(http, source, cursor="abc")

    assert status == 400
    assert "cursor" in body["error"]


async def test_every_request_is_recorded_with_its_run_headers(source, clock, http):
    clock.now += 2.0
    await get_page(http, source, config_id="c-1", run_id="r-1", fence=4)
    await get_page(http, source, config_id="c-1", run_id="r-1", fence=4, cursor="4")
    await get_page(http, source, config_id="c-2", run_id="r-9", fence=1)

    records = source.requests_for("c-1")

    assert [(r.run_id, r.fence, r.cursor, r.status, r.orders) for r in records] == [
        ("r-1", 4, None, 200, 4),
        ("r-1", 4, "4", 200, 0),
    ]
    assert all(r.started <= r.ended for r in records)
    assert not records[0].has_traceparent and not records[0].has_authorization
    assert source.orders_served_for("shop-1", "sku-1") == 8  # c-2 asked for the same pair


async def test_traceparent_and_authorization_are_recorded(live_source, http):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"X-Pull-Config-Id": "c", "X-Pull-Run-Id": "r", "X-Pull-Fence": "1",
               "traceparent": traceparent, "Authorization": "Bearer t0ken"}
    params = {"channel_id": "shop-1", "product_id": "sku-1"}
    async with http.get(live_source.url, params=params, headers=headers) as response:
        await response.read()

    (record,) = live_source.requests_for("c")

    assert record.traceparent == traceparent
    assert record.authorization == "Bearer t0ken"


async def test_runs_one_after_the_other_do_not_overlap(source, http):
    await get_page(http, source, run_id="r-1")
    await get_page(http, source, run_id="r-1")
    await get_page(http, source, run_id="r-2")
    await get_page(http, source, run_id="r-3")

    assert source.overlaps() == []


async def test_a_run_that_resumes_after_another_began_overlaps_it(source, clock, http):
    await get_page(http, source, run_id="r-1")
    clock.now += 1.0
    await get_page(http, source, run_id="r-2")
    clock.now += 1.0
    await get_page(http, source, run_id="r-1")

    assert source.overlaps() == [("shop-1.sku-1", "r-1", "r-2")]


async def test_a_request_still_in_flight_counts_towards_an_overlap(live_source, http):
    live_source.hang("sku-1")
    held = asyncio.create_task(get_page(http, live_source, run_id="r-old"))
    await wait_until(lambda: live_source.in_flight() == 1)

    status, _ = await get_page(http, live_source, product="sku-2", run_id="r-new")

    assert status == 200
    assert live_source.overlaps() == [("shop-1.sku-1", "r-old", "r-new")]
    live_source.heal()
    assert (await held)[0] == 200


async def test_runs_of_different_configs_never_count_as_overlapping(source, http):
    await get_page(http, source, config_id="a", run_id="r-1")
    await get_page(http, source, config_id="b", run_id="r-2")
    await get_page(http, source, config_id="a", run_id="r-1")

    assert source.overlaps() == []


async def test_fail_answers_the_status_for_its_product_only(source, http):
    source.fail("sku-1", status=503, retry_after=7)

    async with http.get(source.url, params={"channel_id": "s", "product_id": "sku-1"}) as failed:
        failed_status, retry_after = failed.status, failed.headers.get("Retry-After")
    other_status, _ = await get_page(http, source, product="sku-2")

    assert (failed_status, retry_after) == (503, "7")
    assert other_status == 200


async def test_fail_with_times_heals_by_itself(source, http):
    source.fail(status=500, times=2)

    statuses = [(await get_page(http, source))[0] for _ in range(3)]

    assert statuses == [500, 500, 200]


async def test_a_rule_for_a_product_wins_over_the_rule_for_all(source, http):
    source.fail(status=500)
    source.fail("sku-1", status=429)

    assert (await get_page(http, source, product="sku-1"))[0] == 429
    assert (await get_page(http, source, product="sku-2"))[0] == 500
    source.heal()
    assert (await get_page(http, source, product="sku-1"))[0] == 200


async def test_hang_holds_requests_until_heal(live_source, http):
    live_source.hang("sku-1")
    held = asyncio.create_task(get_page(http, live_source))
    await asyncio.sleep(0.3)
    assert not held.done()

    live_source.heal("sku-1")

    status, _ = await asyncio.wait_for(held, 5)
    assert status == 200


async def test_an_abandoned_request_is_recorded_as_closed_by_the_client(live_source, http):
    live_source.hang()
    held = asyncio.create_task(get_page(http, live_source, config_id="gone"))
    await wait_until(lambda: live_source.in_flight() == 1)

    held.cancel()
    await wait_until(lambda: live_source.requests_for("gone"))

    assert [r.status for r in live_source.requests_for("gone")] == [CLIENT_CLOSED]
    assert live_source.in_flight() == 0


async def test_delay_answers_late(live_source, http):
    live_source.delay("sku-1", seconds=0.4)

    await get_page(http, live_source)

    (record,) = live_source.requests_for("shop-1.sku-1")
    assert record.status == 200
    assert record.ended - record.started >= 0.4


async def wait_until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
