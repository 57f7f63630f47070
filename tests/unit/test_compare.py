"""The compare step: one table row per branch of `decide`, then the rules that matter most."""

from __future__ import annotations

import dataclasses

import pytest

from reconciler.compare import Action, Decision, Desired, LocalRun, RecordedRun, decide

# A config that should run here, and the loop that runs its current content.
WANTED = Desired(enabled=True, deleted=False, assigned=True, content_key="interval=5")
DISABLED = dataclasses.replace(WANTED, enabled=False)
DELETED = dataclasses.replace(WANTED, deleted=True)
UNASSIGNED = dataclasses.replace(WANTED, assigned=False)

RUNNING = LocalRun(content_key="interval=5", ending=False)
RUNNING_OLD_CONTENT = LocalRun(content_key="interval=10", ending=False)
ENDING = LocalRun(content_key="interval=5", ending=True)

# The table knows of no run but ours and nothing holds the config back.
CLEAR = RecordedRun(foreign_active=False, lease_remaining=0.0, backoff_remaining=0.0)
FOREIGN_LEASED = RecordedRun(foreign_active=True, lease_remaining=7.5, backoff_remaining=0.0)
FOREIGN_EXPIRED = RecordedRun(foreign_active=True, lease_remaining=-2.0, backoff_remaining=0.0)
BACKING_OFF = RecordedRun(foreign_active=False, lease_remaining=0.0, backoff_remaining=4.2)


@pytest.mark.parametrize(
    ("desired", "local", "recorded", "expected"),
    [
        pytest.param(WANTED, ENDING, CLEAR, Decision(Action.WAIT_FOR_STOP), id="local-ending"),
        pytest.param(
            DISABLED, RUNNING, CLEAR, Decision(Action.STOP, reason="disabled"), id="disabled"
        ),
        pytest.param(
            DELETED, RUNNING, CLEAR, Decision(Action.STOP, reason="deleted"), id="deleted"
        ),
        pytest.param(
            None, RUNNING, CLEAR, Decision(Action.STOP, reason="deleted"), id="never-seen"
        ),
        pytest.param(
            UNASSIGNED,
            RUNNING,
            CLEAR,
            Decision(Action.STOP, reason="reassigned"),
            id="not-assigned",
        ),
        pytest.param(
            WANTED,
            RUNNING_OLD_CONTENT,
            CLEAR,
            Decision(Action.RESTART, reason="reconfigured"),
            id="content-changed",
        ),
        pytest.param(WANTED, RUNNING, CLEAR, Decision(Action.NOTHING), id="local-up-to-date"),
        pytest.param(
            WANTED,
            None,
            FOREIGN_LEASED,
            Decision(Action.WAIT_FOR_LEASE, retry_after=7.5),
            id="foreign-lease-held",
        ),
        pytest.param(
            WANTED,
            None,
            FOREIGN_EXPIRED,
            Decision(Action.END_EXPIRED, reason="lease-expired"),
            id="foreign-lease-expired",
        ),
        pytest.param(
            DISABLED,
            None,
            FOREIGN_EXPIRED,
            Decision(Action.END_EXPIRED, reason="lease-expired"),
            id="foreign-lease-expired-config-disabled",
        ),
        pytest.param(DISABLED, None, CLEAR, Decision(Action.NOTHING), id="no-loop-disabled"),
        pytest.param(DELETED, None, CLEAR, Decision(Action.NOTHING), id="no-loop-deleted"),
        pytest.param(None, None, CLEAR, Decision(Action.NOTHING), id="no-loop-never-seen"),
        pytest.param(UNASSIGNED, None, CLEAR, Decision(Action.NOTHING), id="no-loop-unassigned"),
        pytest.param(
            WANTED,
            None,
            BACKING_OFF,
            Decision(Action.WAIT_FOR_BACKOFF, retry_after=4.2),
            id="backing-off",
        ),
        pytest.param(WANTED, None, CLEAR, Decision(Action.START), id="start"),
    ],
)
def test_decide(desired, local, recorded, expected):
    assert decide(desired=desired, local=local, recorded=recorded) == expected


def test_a_slow_stop_is_waited_for_whatever_the_desired_state_says():
    for desired in [WANTED, DISABLED, DELETED, UNASSIGNED, None]:
        decision = decide(desired=desired, local=ENDING, recorded=FOREIGN_EXPIRED)

        assert decision == Decision(Action.WAIT_FOR_STOP), desired


def test_a_deleted_config_stops_as_deleted_even_when_also_disabled():
    deleted_and_disabled = dataclasses.replace(DELETED, enabled=False)

    decision = decide(desired=deleted_and_disabled, local=RUNNING, recorded=CLEAR)

    assert decision == Decision(Action.STOP, reason="deleted")


def test_a_disabled_config_stops_as_disabled_even_when_also_unassigned():
    disabled_and_unassigned = dataclasses.replace(DISABLED, assigned=False)

    decision = decide(desired=disabled_and_unassigned, local=RUNNING, recorded=CLEAR)

    assert decision == Decision(Action.STOP, reason="disabled")


def test_a_foreign_run_with_an_expired_lease_is_ended_whether_or_not_the_config_should_run():
    for desired in [WANTED, DISABLED, DELETED, UNASSIGNED, None]:
        decision = decide(desired=desired, local=None, recorded=FOREIGN_EXPIRED)

        assert decision == Decision(Action.END_EXPIRED, reason="lease-expired"), desired


def test_a_lease_with_no_time_left_counts_as_expired():
    at_expiry = dataclasses.replace(FOREIGN_LEASED, lease_remaining=0.0)

    decision = decide(desired=WANTED, local=None, recorded=at_expiry)

    assert decision == Decision(Action.END_EXPIRED, reason="lease-expired")


def test_a_held_lease_is_waited_for_before_our_own_backoff():
    leased_and_backing_off = dataclasses.replace(FOREIGN_LEASED, backoff_remaining=60.0)

    decision = decide(desired=WANTED, local=None, recorded=leased_and_backing_off)

    assert decision == Decision(Action.WAIT_FOR_LEASE, retry_after=7.5)


def test_a_backoff_does_not_hold_back_a_config_that_should_not_run():
    decision = decide(desired=DISABLED, local=None, recorded=BACKING_OFF)

    assert decision == Decision(Action.NOTHING)


def test_a_backoff_with_no_time_left_is_over():
    at_end_of_backoff = dataclasses.replace(BACKING_OFF, backoff_remaining=0.0)

    decision = decide(desired=WANTED, local=None, recorded=at_end_of_backoff)

    assert decision == Decision(Action.START)
