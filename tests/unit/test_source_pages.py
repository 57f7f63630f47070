"""What a source's answer may look like (`parse_page`), and how one pull treats the pages it
gets (`PagingGuard`): a cursor that stops advancing, too many pages, repeated orders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.source import (
    MAX_CURSOR_CHARS,
    MAX_ORDER_ID_CHARS,
    Page,
    PagingGuard,
    PullFailed,
    parse_page,
)


def body(value) -> bytes:
    return json.dumps(value).encode()


def failure(raw: bytes) -> str:
    with pytest.raises(PullFailed) as raised:
        parse_page(raw)
    return str(raised.value)


# ---- parse_page ---------------------------------------------------------------------------


def test_a_page_of_the_contract_shape_is_taken_with_unknown_fields_kept():
    page = parse_page(body({"orders": [{"id": "o-1", "qty": 2, "x": {"y": [1]}}, {"id": 7}],
                            "next_cursor": "c-2", "extra": True}))

    assert page == Page(orders=[{"id": "o-1", "qty": 2, "x": {"y": [1]}}, {"id": 7}],
                        next_cursor="c-2")


def test_an_empty_page_may_carry_a_cursor_or_none():
    assert parse_page(b'{"orders": [], "next_cursor": null}') == Page([], None)
    assert parse_page(b'{"orders": []}') == Page([], None)
    assert parse_page(b'{"orders": [], "next_cursor": "c"}') == Page([], "c")


@pytest.mark.parametrize("raw, reason", [
    (b"", "source body is not JSON"),
    (b"<html>busy</html>", "source body is not JSON"),
    (b'{"orders": []', "source body is not JSON"),
    (b'\xff\xfe{"orders": []}', "source body is not JSON"),
    (b'{"orders": [{"id": "\xed\xa0\x80"}], "next_cursor": "c"}',
     "source body is not JSON: it is not UTF-8 text"),
    (b'{"orders": [{"id": "a"}], "next_cursor": "c\xed\xa0\x81"}',
     "source body is not JSON: it is not UTF-8 text"),
    ('{"orders": []}'.encode("utf-16"), "source body is not JSON: it is not UTF-8 text"),
    (b'{"orders": []} trailing', "source body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "source body is not JSON"),
    (b'{"orders": [{"id": 1' + b"0" * 5000 + b"}]}",
     "source body holds an integer of 5001 digits, more than the 4300 the product reads"),
    (b'{"orders": [{"id": -1' + b"0" * 4300 + b"}]}",
     "source body holds an integer of 4301 digits, more than the 4300 the product reads"),
    (b"null", "source body is not a JSON object"),
    (b'[{"id": "o-1"}]', "source body is not a JSON object"),
    (b'"orders"', "source body is not a JSON object"),
    (b"{}", "source body has no 'orders' list"),
    (b'{"orders": null}', "source body has no 'orders' list"),
    (b'{"orders": {"id": "o-1"}}', "source body has no 'orders' list"),
    (b'{"orders": "[]"}', "source body has no 'orders' list"),
    (b'{"orders": ["o-1"], "next_cursor": "c"}', "order 0 of the page is not an object"),
    (b'{"orders": [{"id": "a"}, null], "next_cursor": "c"}',
     "order 1 of the page is not an object"),
    (b'{"orders": [{"name": "x"}], "next_cursor": "c"}', "order 0 of the page has no usable 'id'"),
    (b'{"orders": [{"id": ""}], "next_cursor": "c"}', "order 0 of the page has no usable 'id'"),
    (b'{"orders": [{"id": null}], "next_cursor": "c"}', "order 0 of the page has no usable 'id'"),
    (b'{"orders": [{"id": true}], "next_cursor": "c"}', "order 0 of the page has no usable 'id'"),
    (b'{"orders": [{"id": 1.5}], "next_cursor": "c"}', "order 0 of the page has no usable 'id'"),
    (b'{"orders": [{"id": ["a"]}], "next_cursor": "c"}', "order 0 of the page has no usable 'id'"),
    (b'{"orders": [{"id": "a"}]}', "source returned orders with a null 'next_cursor'"),
    (b'{"orders": [{"id": "a"}], "next_cursor": null}',
     "source returned orders with a null 'next_cursor'"),
    (b'{"orders": [], "next_cursor": 5}', "source 'next_cursor' is neither a string nor null"),
    (b'{"orders": [], "next_cursor": {"page": 2}}',
     "source 'next_cursor' is neither a string nor null"),
    (b'{"orders": [], "next_cursor": "a\\u0000b"}', "source 'next_cursor' holds a NUL character"),
    (b'{"orders": [{"id": "a", "n": NaN}], "next_cursor": "c"}',
     "source body holds NaN, which JSON has no number for"),
    (b'{"orders": [{"id": "a", "n": -Infinity}], "next_cursor": "c"}',
     "source body holds -Infinity, which JSON has no number for"),
    (b'{"orders": [{"id": "a", "n": 1e400}], "next_cursor": "c"}',
     "source body holds a number too large for a double, which JSON has no number for"),
    (b'{"orders": [{"id": "a", "note": "\\ud800"}], "next_cursor": "c"}',
     "source body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"),
    (b'{"orders": [{"id": "\\udfff"}], "next_cursor": "c"}',
     "source body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"),
    (b'{"orders": [], "next_cursor": "\\uDBFF"}',
     "source body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"),
])
def test_odd_shapes_are_failed_pulls_saying_what_is_wrong(raw, reason):
    assert failure(raw).startswith(reason)


def test_an_id_longer_than_the_limit_is_refused_and_one_at_it_is_taken():
    at_limit = body({"orders": [{"id": "i" * MAX_ORDER_ID_CHARS}], "next_cursor": "c"})
    over = body({"orders": [{"id": "i" * (MAX_ORDER_ID_CHARS + 1)}], "next_cursor": "c"})

    assert parse_page(at_limit).orders[0]["id"] == "i" * MAX_ORDER_ID_CHARS
    assert failure(over) == (f"order 0 of the page has an 'id' longer than "
                             f"{MAX_ORDER_ID_CHARS} characters")


def test_a_cursor_longer_than_the_limit_is_refused_and_one_at_it_is_taken():
    assert parse_page(body({"orders": [], "next_cursor": "c" * MAX_CURSOR_CHARS})).next_cursor
    assert failure(body({"orders": [], "next_cursor": "c" * (MAX_CURSOR_CHARS + 1)})) == (
        f"source 'next_cursor' is longer than {MAX_CURSOR_CHARS} characters")


def test_a_surrogate_pair_is_ordinary_text():
    page = parse_page(b'{"orders": [{"id": "a", "note": "\\ud83d\\ude00"}], "next_cursor": "c"}')

    assert page.orders[0]["note"] == "\N{GRINNING FACE}"


def test_a_failure_never_quotes_the_body():
    # The body may hold anything, a credential among it; reasons name fields, never values.
    secretish = "tok-3b1f9c2e"
    for raw in (secretish.encode(), body({"orders": [{"id": True, "t": secretish}]}),
                body({"orders": [], "next_cursor": [secretish]})):
        assert secretish not in failure(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(value=json_values)
def test_any_json_value_is_either_a_page_or_a_failed_pull(value):
    raw = json.dumps(value).encode()
    try:
        page = parse_page(raw)
    except PullFailed:
        return
    assert isinstance(page.orders, list)
    assert all(isinstance(order, dict) for order in page.orders)
    assert page.next_cursor is not None or not page.orders


@given(raw=st.binary(max_size=200))
def test_any_bytes_are_either_a_page_or_a_failed_pull(raw):
    try:
        parse_page(raw)
    except PullFailed:
        pass


# ---- PagingGuard --------------------------------------------------------------------------


def page(cursor: str, *ids) -> Page:
    return Page(orders=[{"id": i} for i in ids], next_cursor=cursor)


def guard(cursor: str | None = None, max_pages: int = 100) -> PagingGuard:
    return PagingGuard(cursor=cursor, channel_id="shop-1", max_pages=max_pages)


def test_pages_whose_cursor_advances_are_admitted_whole():
    paging = guard("c0")

    admitted = [paging.admit(page("c1", "a", "b")), paging.admit(page("c2", "c"))]

    assert admitted == [page("c1", "a", "b"), page("c2", "c")]


def test_a_cursor_equal_to_the_one_asked_with_stops_the_paging():
    paging = guard("c0")

    with pytest.raises(PullFailed) as raised:
        paging.admit(page("c0", "a"))

    assert str(raised.value) == (
        "source's next_cursor did not advance: page 1 of this pull has 1 orders and a cursor "
        "this pull already used; paging stopped and nothing of that page was published")


def test_a_cursor_that_comes_back_after_others_stops_the_paging():
    paging = guard(None)
    paging.admit(page("c1", "a"))
    paging.admit(page("c2", "b"))

    with pytest.raises(PullFailed, match="page 3 of this pull has 1 orders"):
        paging.admit(page("c1", "c"))


def test_the_pages_of_a_pull_are_capped():
    paging = guard(None, max_pages=3)
    for n in range(3):
        paging.admit(page(f"c{n}", f"o{n}"))

    with pytest.raises(PullFailed) as raised:
        paging.admit(page("c3", "o3"))

    assert str(raised.value) == (
        "source still had orders after 3 pages in one pull "
        "(RECONCILER_SOURCE_MAX_PAGES_PER_PULL); paging stopped, and the next run goes on "
        "from the saved cursor")


def test_an_order_repeated_within_a_page_or_across_pages_is_admitted_once():
    paging = guard(None)

    first = paging.admit(page("c1", "a", "b", "a"))
    second = paging.admit(page("c2", "b", "c"))

    assert first == page("c1", "a", "b")
    assert second == page("c2", "c")


def test_a_page_of_repeated_orders_only_is_admitted_empty_with_its_cursor():
    paging = guard(None)
    paging.admit(page("c1", "a"))

    assert paging.admit(page("c2", "a")) == Page(orders=[], next_cursor="c2")


def test_ids_are_compared_by_their_key_so_7_and_the_text_7_are_one_order():
    # Both are published under the key `shop-1:7`: one of them is enough.
    paging = guard(None)

    assert paging.admit(page("c1", 7, "7")) == page("c1", 7)


def test_a_new_pull_forgets_the_orders_of_the_last():
    guard(None).admit(page("c1", "a"))

    assert guard(None).admit(page("c1", "a")) == page("c1", "a")
