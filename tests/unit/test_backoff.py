"""The delay before a failed config's next run: doubling from `initial`, jittered, capped."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import instance
from reconciler.instance import backoff_delay

INITIAL = 1.0
CAP = 300.0
# The jitter adds at most a quarter.
MOST_JITTER = 1.25


@pytest.fixture
def least_jitter(monkeypatch):
    monkeypatch.setattr(instance.random, "uniform", lambda low, high: low)


@pytest.fixture
def most_jitter(monkeypatch):
    monkeypatch.setattr(instance.random, "uniform", lambda low, high: high)


def test_the_first_delay_is_initial_at_least(least_jitter):
    assert backoff_delay(1, initial=INITIAL, cap=CAP) == INITIAL


def test_the_first_delay_is_a_quarter_above_initial_at_most(most_jitter):
    assert backoff_delay(1, initial=INITIAL, cap=CAP) == pytest.approx(MOST_JITTER * INITIAL)


def test_the_delay_doubles_with_each_attempt_before_jitter(least_jitter):
    delays = [backoff_delay(attempt, initial=2.0, cap=CAP) for attempt in range(1, 6)]

    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0]


def jitter_from(rng):
    return mock.patch.object(instance.random, "uniform", rng.uniform)


@given(rng=st.randoms(use_true_random=False))
def test_the_first_delay_lies_between_initial_and_a_quarter_above(rng):
    with jitter_from(rng):
        delay = backoff_delay(1, initial=INITIAL, cap=CAP)

    assert INITIAL <= delay <= MOST_JITTER * INITIAL


def test_each_delay_is_longer_than_the_one_before_even_with_the_most_and_least_jitter(
    monkeypatch,
):
    # Worst case for growth: the attempt before draws the most jitter, the next the least.
    draws = iter([1.25, 1.0] * 20)
    monkeypatch.setattr(instance.random, "uniform", lambda low, high: next(draws))

    for attempt in range(1, 9):
        before = backoff_delay(attempt, initial=INITIAL, cap=CAP)
        after = backoff_delay(attempt + 1, initial=INITIAL, cap=CAP)

        assert after > before, attempt


@given(
    rng=st.randoms(use_true_random=False),
    initial=st.floats(min_value=0.01, max_value=60.0),
    cap=st.floats(min_value=1.0, max_value=3600.0),
)
def test_delays_grow_strictly_until_the_cap_and_never_exceed_it(rng, initial, cap):
    with jitter_from(rng):
        delays = [backoff_delay(attempt, initial=initial, cap=cap) for attempt in range(1, 40)]

    assert all(delay <= cap for delay in delays)
    for before, after in zip(delays, delays[1:]):
        if before < cap:
            assert after > before
        else:
            assert after == cap
    assert delays[-1] == cap


@pytest.mark.parametrize("attempt", [61, 62, 1_000, 10**6, 10**100])
def test_huge_attempt_numbers_give_the_cap_without_overflow(attempt):
    assert backoff_delay(attempt, initial=INITIAL, cap=CAP) == CAP


def test_the_first_delay_never_exceeds_a_cap_below_initial():
    assert backoff_delay(1, initial=10.0, cap=5.0) == 5.0
