"""The compare step: desired state and actual state in, one action out.

A reconcile reads the desired state (the config row written from the configs topic) and
the actual state (this instance's loop for the config, if any, and what the table says
about the config's current run and lease), then asks `decide` what to do. `decide` is a
pure function, so every branch is tested with plain values; the instance carries out the
action and, for actions that wait, schedules the next reconcile.

Order of concerns inside `decide`: first our own loop (stop it, restart it, leave it, or
wait for a slow stop to end), then someone else's run still recorded in the table (wait
for its lease or end it as expired), then our own backoff, and only then a start.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    NOTHING = "nothing"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    # Our loop is still ending after a stop; reconcile again when it has ended.
    WAIT_FOR_STOP = "wait-for-stop"
    # Another run holds a live lease on the config; reconcile again when it can expire.
    WAIT_FOR_LEASE = "wait-for-lease"
    # A run recorded in the table has an expired lease: end it in the record first.
    END_EXPIRED = "end-expired"
    # The last run failed; reconcile again when its backoff is over.
    WAIT_FOR_BACKOFF = "wait-for-backoff"


@dataclass(frozen=True, slots=True)
class Desired:
    """What should run here; the caller passes None for a config never seen."""

    enabled: bool
    deleted: bool
    # The config's partition of the configs topic is assigned to this instance.
    assigned: bool
    # The normalised content that decides whether a running loop must restart: everything
    # but `enabled` and `version`.
    content_key: str


@dataclass(frozen=True, slots=True)
class LocalRun:
    """This instance's loop for the config."""

    content_key: str
    # The loop was asked to stop (or has crashed) and its task has not ended yet.
    ending: bool


@dataclass(frozen=True, slots=True)
class RecordedRun:
    """What the table says about the config's current run, seen from this instance."""

    # A run is recorded as active (running or stopping) and it is not our local loop.
    foreign_active: bool
    # Seconds until that run's lease expires by the database clock; <= 0 when expired.
    lease_remaining: float
    # Seconds until a failed run's backoff is over; <= 0 when not backing off.
    backoff_remaining: float


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    # Why a stop happens, as the contract's `reason` of `pull.task.stopped`.
    reason: str | None = None
    # For the waiting actions: when to reconcile again, in seconds.
    retry_after: float | None = None


def decide(*, desired: Desired | None, local: LocalRun | None, recorded: RecordedRun) -> Decision:
    wants_run = (
        desired is not None and desired.enabled and not desired.deleted and desired.assigned
    )

    if local is not None:
        if local.ending:
            return Decision(Action.WAIT_FOR_STOP)
        if not wants_run:
            return Decision(Action.STOP, reason=_stop_reason(desired))
        if local.content_key != desired.content_key:
            return Decision(Action.RESTART, reason="reconfigured")
        return Decision(Action.NOTHING)

    if recorded.foreign_active:
        if recorded.lease_remaining > 0:
            return Decision(Action.WAIT_FOR_LEASE, retry_after=recorded.lease_remaining)
        return Decision(Action.END_EXPIRED, reason="lease-expired")

    if not wants_run:
        return Decision(Action.NOTHING)
    if recorded.backoff_remaining > 0:
        return Decision(Action.WAIT_FOR_BACKOFF, retry_after=recorded.backoff_remaining)
    return Decision(Action.START)


def _stop_reason(desired: Desired | None) -> str:
    if desired is None or desired.deleted:
        return "deleted"
    if not desired.enabled:
        return "disabled"
    return "reassigned"
