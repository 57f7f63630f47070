"""Lifecycle events: what `<p>.task-events` carries about each run of a config.

A run announces itself once with `pull.task.started` and ends with exactly one
`pull.task.stopped` (with a reason) or `pull.task.failed` (with the error and when the
next run is due). Events are CloudEvents 1.0 in structured JSON mode: the whole event is
the record's value, and the Kafka header `content-type` says so. The W3C `traceparent`
travels twice, as a header for the tracing libraries and as the CloudEvents extension
attribute for anyone who reads only the value.

The events are built as plain dicts and written with the standard json module; the
`cloudevents` SDK checks them against the CloudEvents 1.0 rules. The SDK's own writer is
not used because it formats `time` with microseconds where the contract shows
milliseconds, and its Kafka binding writes `content-type` without the charset parameter.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone
from typing import Any

from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.v1.event import CloudEvent

from streams.configs import MAX_VERSION, InvalidRecord, is_valid_config_id, parse_strict_json

EVENT_STARTED = "pull.task.started"
EVENT_STOPPED = "pull.task.stopped"
EVENT_FAILED = "pull.task.failed"
EVENT_TYPES = frozenset({EVENT_STARTED, EVENT_STOPPED, EVENT_FAILED})
STOP_REASONS = frozenset(
    {"disabled", "deleted", "reconfigured", "reassigned", "lease-lost", "lease-expired",
     "shutdown"}
)

CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"
DATA_CONTENT_TYPE = "application/json"
SOURCE_PREFIX = "reconciler/"

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_MISSING: Any = object()
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def lifecycle_event(
    *,
    event_type: str,
    config_id: str,
    run_id: str,
    instance_id: str,
    emitter_id: str,
    fence: int,
    config_version: int | None,
    reason: str | None = None,
    error: str | None = None,
    attempt: int | None = None,
    retry_in_seconds: float | None = None,
    traceparent: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    """Build one lifecycle event as a JSON-ready dict; raises ValueError if it breaks a rule.

    `instance_id` is the instance that ran the run; `emitter_id` the one sending the event
    (they differ when a peer ends a run whose lease expired). A stopped event needs a
    reason from STOP_REASONS; a failed event needs `error`, `attempt` (1 for the first
    failure in a row) and `retry_in_seconds`; the other fields stay None.
    """
    if time is None:
        time = datetime.now(timezone.utc)
    elif time.tzinfo is None:
        raise ValueError("time must carry a time zone; a naive datetime is ambiguous")

    data: dict[str, Any] = {
        "config_id": config_id,
        "run_id": run_id,
        "instance_id": instance_id,
        "fence": fence,
        "config_version": config_version,
        "reason": reason,
        "error": error,
    }
    if event_type == EVENT_FAILED:
        data["attempt"] = attempt
        data["retry_in_seconds"] = _float_if_number(retry_in_seconds)
    elif attempt is not None or retry_in_seconds is not None:
        raise ValueError("attempt and retry_in_seconds belong to pull.task.failed events only")

    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()) if event_id is None else event_id,
        "source": f"{SOURCE_PREFIX}{emitter_id}",
        "type": event_type,
        "subject": config_id,
        "time": _rfc3339_millis(time),
        "datacontenttype": DATA_CONTENT_TYPE,
        "data": data,
    }
    if traceparent is not None:
        event["traceparent"] = traceparent

    _check_event(event)
    return event


def encode_lifecycle_event(event: dict[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The record value and Kafka headers of an event, per the CloudEvents Kafka binding."""
    _check_event(event)

    value = json.dumps(
        event, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    headers = [("content-type", CONTENT_TYPE.encode("ascii"))]
    if "traceparent" in event:
        headers.append(("traceparent", event["traceparent"].encode("ascii")))
    return value, headers


def decode_lifecycle_event(value: bytes) -> dict[str, Any]:
    """Parse a record value of `<p>.task-events`; raises ValueError unless it is our event.

    Attributes and data fields this version does not know are kept and not checked, so a
    reader of this version can follow events written by a later one.
    """
    try:
        event = parse_strict_json(value, what="event")
    except InvalidRecord as invalid:
        raise ValueError(invalid.reason) from None

    _check_event(event)
    return event


def _check_event(event: Any) -> None:
    if not isinstance(event, dict):
        raise ValueError(f"a lifecycle event must be a JSON object, got {_show(event)}")

    problems = _envelope_problems(event)
    data = _get(event, "data")
    if isinstance(data, dict):
        problems += _data_problems(_get(event, "type"), data)
        if "config_id" in data and _get(event, "subject") != data["config_id"]:
            problems.append("subject must equal data.config_id")
    else:
        problems.append("data must be a JSON object")
    if problems:
        raise ValueError("not a lifecycle event of this reconciler: " + "; ".join(problems))

    _check_cloudevents_rules(event)


def _envelope_problems(event: dict[str, Any]) -> list[str]:
    problems = []
    if _get(event, "specversion") != "1.0":
        problems.append(f"specversion must be '1.0', got {_show(_get(event, 'specversion'))}")
    if not _is_text(_get(event, "id")):
        problems.append("id must be a non-empty string")
    source = _get(event, "source")
    if not (isinstance(source, str) and source.startswith(SOURCE_PREFIX)
            and len(source) > len(SOURCE_PREFIX)):
        problems.append(f"source must be 'reconciler/<instance id>', got {_show(source)}")
    if not _is_one_of(_get(event, "type"), EVENT_TYPES):
        problems.append(
            f"type must be one of {', '.join(sorted(EVENT_TYPES))}, "
            f"got {_show(_get(event, 'type'))}"
        )
    if not (isinstance(_get(event, "time"), str) and _parse_time(event["time"]) is not None):
        problems.append(
            "time must be RFC 3339 in UTC with milliseconds, like 2026-12-04T15:00:00.123Z, "
            f"got {_show(_get(event, 'time'))}"
        )
    if _get(event, "datacontenttype") != DATA_CONTENT_TYPE:
        problems.append(
            f"datacontenttype must be '{DATA_CONTENT_TYPE}', "
            f"got {_show(_get(event, 'datacontenttype'))}"
        )
    traceparent = _get(event, "traceparent")
    if traceparent is not _MISSING and not (
        isinstance(traceparent, str) and _TRACEPARENT.fullmatch(traceparent)
    ):
        problems.append(f"traceparent must be a W3C traceparent, got {_show(traceparent)}")
    return problems


def _data_problems(event_type: Any, data: dict[str, Any]) -> list[str]:
    problems = []
    config_id = _get(data, "config_id")
    if not (isinstance(config_id, str) and is_valid_config_id(config_id)):
        problems.append(f"data.config_id must be a config id, got {_show(config_id)}")
    for name in ("run_id", "instance_id"):
        if not _is_text(_get(data, name)):
            problems.append(
                f"data.{name} must be a non-empty string, got {_show(_get(data, name))}"
            )
    if not _is_int_in(_get(data, "fence"), 0, MAX_VERSION):
        problems.append(
            f"data.fence must be an integer of at least 0, got {_show(_get(data, 'fence'))}"
        )
    version = _get(data, "config_version")
    if version is not None and not _is_int_in(version, 0, MAX_VERSION):
        problems.append(f"data.config_version must be null or an integer, got {_show(version)}")

    reason = _get(data, "reason")
    error = _get(data, "error")
    if event_type == EVENT_STOPPED and not _is_one_of(reason, STOP_REASONS):
        problems.append(
            f"data.reason of a stopped event must be one of {', '.join(sorted(STOP_REASONS))}, "
            f"got {_show(reason)}"
        )
    if event_type in (EVENT_STARTED, EVENT_FAILED) and reason is not None:
        problems.append(f"data.reason must be null for {event_type}, got {_show(reason)}")
    if event_type == EVENT_FAILED and not _is_text(error):
        problems.append(f"data.error of a failed event must say what failed, got {_show(error)}")
    if event_type in (EVENT_STARTED, EVENT_STOPPED) and error is not None:
        problems.append(f"data.error must be null for {event_type}, got {_show(error)}")

    if event_type == EVENT_FAILED:
        if not _is_int_in(_get(data, "attempt"), 1, MAX_VERSION):
            problems.append(
                f"data.attempt must be an integer of at least 1, got {_show(_get(data, 'attempt'))}"
            )
        retry = _get(data, "retry_in_seconds")
        # Compared, not converted: an integer too large for a float must fail, not raise.
        if not (_is_number(retry) and 0 <= retry < math.inf):
            problems.append(
                f"data.retry_in_seconds must be a number of seconds, got {_show(retry)}"
            )
    return problems


def _check_cloudevents_rules(event: dict[str, Any]) -> None:
    # Our own checks cover our attributes; the SDK adds the spec's rules for the rest,
    # such as extension attribute names (lower-case letters and digits only).
    attributes = {name: item for name, item in event.items() if name != "data"}
    attributes["time"] = _parse_time(event["time"])
    try:
        CloudEvent(attributes, event["data"])
    except CloudEventValidationError as error:
        raise ValueError(f"not a valid CloudEvent: {error}") from None


def _rfc3339_millis(moment: datetime) -> str:
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def _parse_time(text: str) -> datetime | None:
    if not _TIME.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _float_if_number(value: Any) -> Any:
    try:
        return float(value) if _is_number(value) else value
    except OverflowError:
        return value


def _is_one_of(value: Any, choices: frozenset[str]) -> bool:
    return isinstance(value, str) and value in choices


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _get(document: dict[str, Any], name: str) -> Any:
    return document.get(name, _MISSING)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    shown = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return shown if len(shown) <= 80 else shown[:80] + "…"
