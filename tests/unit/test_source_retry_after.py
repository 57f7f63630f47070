"""`Retry-After` of a 429 or 503, in both of its forms, turned into seconds to wait."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from reconciler.source import parse_retry_after

NOW = datetime(2026, 12, 4, 15, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("value, seconds", [
    ("0", 0.0),
    ("7", 7.0),
    ("120", 120.0),
    (" 30 ", 30.0),
    ("1.5", 1.5),          # not the RFC's form, but a polite client waits anyway
    ("86400", 86400.0),
])
def test_delay_seconds_are_taken_as_they_are(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize("value", [
    "Fri, 04 Dec 2026 15:00:09 GMT",     # IMF-fixdate, the preferred form
    "Friday, 04-Dec-26 15:00:09 GMT",    # RFC 850
    "Fri Dec  4 15:00:09 2026",          # asctime, which carries no zone: GMT
])
def test_an_http_date_in_each_form_is_the_time_until_it(value):
    assert parse_retry_after(value, now=NOW) == 9.0


def test_an_http_date_in_the_past_means_no_wait():
    assert parse_retry_after("Fri, 04 Dec 2026 14:00:00 GMT", now=NOW) == 0.0


def test_a_date_far_ahead_is_passed_on_whole_for_the_backoff_to_cap():
    later = NOW + timedelta(days=3)

    assert parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), now=NOW) == 3 * 86400


@pytest.mark.parametrize("value", [
    None, "", "-5", "+5", "1e3", "inf", "nan", "NaN", "0x10", "5 s", "soon", "\u0663",
    "12345678901", "9" * 5000, "Fri, 32 Dec 2026 15:00:09 GMT", "Fri, 04 Dec 2026",
    "Fri, 04 Dec 2026 15:00:09 GMT" + " " * 40 + "x",
])
def test_anything_else_is_ignored(value):
    assert parse_retry_after(value, now=NOW) is None
