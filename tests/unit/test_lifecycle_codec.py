"""Lifecycle events against the contract's "Lifecycle events" section."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.lifecycle import (
    EVENT_FAILED,
    EVENT_STARTED,
    EVENT_STOPPED,
    STOP_REASONS,
    decode_lifecycle_event,
    encode_lifecycle_event,
    lifecycle_event,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
AT = datetime(2026, 12, 4, 15, 0, 0, 123456, tzinfo=timezone.utc)


def event(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "event_type": EVENT_STARTED,
        "config_id": "shop-42.sku-7",
        "run_id": "run-1",
        "instance_id": "instance-a",
        "emitter_id": "instance-a",
        "fence": 17,
        "config_version": 3,
        "event_id": "5b0c0000-0000-4000-8000-000000000001",
        "time": AT,
    }
    arguments.update(overrides)
    return lifecycle_event(**arguments)


def failed(**overrides: Any) -> dict[str, Any]:
    arguments = {"event_type": EVENT_FAILED, "error": "HTTP 503 from the source",
                 "attempt": 2, "retry_in_seconds": 4.2}
    arguments.update(overrides)
    return event(**arguments)


def stopped(**overrides: Any) -> dict[str, Any]:
    return event(**{"event_type": EVENT_STOPPED, "reason": "disabled", **overrides})


# --- building -------------------------------------------------------------------------


def test_started_event_has_exactly_the_contract_shape():
    assert event(traceparent=TRACEPARENT) == {
        "specversion": "1.0",
        "id": "5b0c0000-0000-4000-8000-000000000001",
        "source": "reconciler/instance-a",
        "type": "pull.task.started",
        "subject": "shop-42.sku-7",
        "time": "2026-12-04T15:00:00.123Z",
        "datacontenttype": "application/json",
        "data": {"config_id": "shop-42.sku-7", "run_id": "run-1", "instance_id": "instance-a",
                 "fence": 17, "config_version": 3, "reason": None, "error": None},
        "traceparent": TRACEPARENT,
    }


def test_source_names_the_emitting_instance_and_data_the_instance_that_ran():
    built = stopped(reason="lease-expired", instance_id="vanished", emitter_id="successor")

    assert built["source"] == "reconciler/successor"
    assert built["data"]["instance_id"] == "vanished"


def test_failed_event_adds_attempt_and_retry_in_seconds():
    built = failed(retry_in_seconds=4)

    assert built["type"] == "pull.task.failed"
    assert built["data"] == {
        "config_id": "shop-42.sku-7", "run_id": "run-1", "instance_id": "instance-a",
        "fence": 17, "config_version": 3, "reason": None, "error": "HTTP 503 from the source",
        "attempt": 2, "retry_in_seconds": 4.0,
    }
    assert isinstance(built["data"]["retry_in_seconds"], float)


@pytest.mark.parametrize("reason", sorted(STOP_REASONS))
def test_stopped_event_carries_each_contract_reason(reason):
    assert stopped(reason=reason)["data"]["reason"] == reason


def test_stop_reasons_are_exactly_the_contract_list():
    assert STOP_REASONS == {"disabled", "deleted", "reconfigured", "reassigned", "lease-lost",
                            "lease-expired", "shutdown"}


def test_unversioned_config_has_null_config_version():
    assert event(config_version=None)["data"]["config_version"] is None


def test_time_is_utc_with_milliseconds_and_z():
    in_berlin = AT.astimezone(timezone(timedelta(hours=1)))

    assert event(time=in_berlin)["time"] == "2026-12-04T15:00:00.123Z"
    assert event(time=AT.replace(microsecond=0))["time"] == "2026-12-04T15:00:00.000Z"


def test_time_defaults_to_now():
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)

    built = event(time=None)

    stamped = datetime.fromisoformat(built["time"])
    assert before <= stamped <= datetime.now(timezone.utc)


def test_naive_time_is_rejected():
    with pytest.raises(ValueError, match="time zone"):
        event(time=datetime(2026, 12, 4, 15, 0))


def test_id_defaults_to_a_fresh_uuid4():
    first, second = event(event_id=None)["id"], event(event_id=None)["id"]

    assert first != second
    assert uuid.UUID(first).version == 4


def test_traceparent_is_left_out_when_not_given():
    assert "traceparent" not in event()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"event_type": "pull.task.paused"}, "type must be one of"),
        ({"event_type": EVENT_STOPPED}, "data.reason of a stopped event must be one of"),
        ({"event_type": EVENT_STOPPED, "reason": "bored"}, "data.reason of a stopped event"),
        ({"reason": "disabled"}, "data.reason must be null for pull.task.started"),
        ({"error": "boom"}, "data.error must be null for pull.task.started"),
        ({"attempt": 1}, "attempt and retry_in_seconds belong to pull.task.failed"),
        ({"retry_in_seconds": 1.0}, "attempt and retry_in_seconds belong to pull.task.failed"),
        ({"config_id": "shop 42"}, "data.config_id must be a config id"),
        ({"run_id": ""}, "data.run_id must be a non-empty string"),
        ({"instance_id": None}, "data.instance_id must be a non-empty string"),
        ({"emitter_id": ""}, "source must be 'reconciler/<instance id>'"),
        ({"fence": -1}, "data.fence must be an integer"),
        ({"fence": True}, "data.fence must be an integer"),
        ({"config_version": 3.0}, "data.config_version must be null or an integer"),
        ({"traceparent": "not-a-traceparent"}, "traceparent must be a W3C traceparent"),
        ({"event_id": ""}, "id must be a non-empty string"),
    ],
)
def test_event_that_breaks_a_rule_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        event(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"error": None}, "data.error of a failed event must say what failed"),
        ({"error": ""}, "data.error of a failed event must say what failed"),
        ({"attempt": None}, "data.attempt must be an integer of at least 1"),
        ({"attempt": 0}, "data.attempt must be an integer of at least 1"),
        ({"retry_in_seconds": None}, "data.retry_in_seconds must be a number of seconds"),
        ({"retry_in_seconds": -1}, "data.retry_in_seconds must be a number of seconds"),
        ({"retry_in_seconds": float("nan")}, "data.retry_in_seconds must be a number"),
        ({"reason": "shutdown"}, "data.reason must be null for pull.task.failed"),
    ],
)
def test_failed_event_needs_error_attempt_and_retry(overrides, message):
    with pytest.raises(ValueError, match=message):
        failed(**overrides)


def test_stopped_event_carries_no_error():
    with pytest.raises(ValueError, match="data.error must be null for pull.task.stopped"):
        stopped(error="lease renewal timed out")


# --- the wire -------------------------------------------------------------------------


def test_encoding_sets_the_structured_mode_content_type_and_traceparent_headers():
    _, headers = encode_lifecycle_event(event(traceparent=TRACEPARENT))

    assert headers == [
        ("content-type", b"application/cloudevents+json; charset=UTF-8"),
        ("traceparent", TRACEPARENT.encode()),
    ]


def test_encoding_without_traceparent_sends_only_the_content_type_header():
    _, headers = encode_lifecycle_event(event())

    assert headers == [("content-type", b"application/cloudevents+json; charset=UTF-8")]


def test_encoded_value_is_the_whole_event_as_compact_utf8_json():
    built = failed(error="Zeitüberschreitung", traceparent=TRACEPARENT)

    value, _ = encode_lifecycle_event(built)

    assert json.loads(value.decode("utf-8")) == built
    assert "Zeitüberschreitung".encode() in value
    assert b": " not in value


@pytest.mark.parametrize("build", [event, failed, stopped])
def test_events_round_trip_through_encode_and_decode(build):
    built = build(traceparent=TRACEPARENT)

    value, _ = encode_lifecycle_event(built)

    assert decode_lifecycle_event(value) == built


def test_encoding_refuses_an_event_that_breaks_a_rule():
    broken = event()
    broken["data"]["fence"] = "17"

    with pytest.raises(ValueError, match="data.fence"):
        encode_lifecycle_event(broken)


def test_decoding_keeps_fields_a_later_version_may_add():
    built = event()
    built["data"]["pull_count"] = 12
    built["region"] = "eu"

    assert decode_lifecycle_event(json.dumps(built).encode()) == built


def wire(mutate) -> bytes:
    built = event(traceparent=TRACEPARENT)
    mutate(built)
    return json.dumps(built).encode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", "event is empty"),
        (b"\xff", "event is not valid UTF-8"),
        (b"{", "event is not valid JSON"),
        (b"[]", "a lifecycle event must be a JSON object, got an array"),
        (b'{"id": "a", "id": "b"}', "duplicate key 'id'"),
        (wire(lambda e: e.update(specversion="0.3")), "specversion must be '1.0'"),
        (wire(lambda e: e.update(type="com.example.other")), "type must be one of"),
        (wire(lambda e: e.update(source="/elsewhere")), "source must be 'reconciler/"),
        (wire(lambda e: e.update(subject="other")), "subject must equal data.config_id"),
        (wire(lambda e: e.update(time="2026-12-04T15:00:00Z")), "time must be RFC 3339"),
        (wire(lambda e: e.update(time="2026-13-04T15:00:00.000Z")), "time must be RFC 3339"),
        (wire(lambda e: e.update(datacontenttype="text/plain")), "datacontenttype must be"),
        (wire(lambda e: e.pop("data")), "data must be a JSON object"),
        (wire(lambda e: e["data"].pop("run_id")), "data.run_id must be a non-empty string"),
        (wire(lambda e: e["data"].pop("reason")), "data.reason must be null"),
        (wire(lambda e: e.update(traceparent=None)), "traceparent must be a W3C traceparent"),
        (wire(lambda e: e.update(Region="eu")), "not a valid CloudEvent"),
    ],
)
def test_decoding_rejects_what_is_not_our_cloudevent(value, message):
    with pytest.raises(ValueError, match=message):
        decode_lifecycle_event(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
quick = settings(max_examples=150, deadline=None)


def decodes_or_raises_value_error(value: bytes) -> None:
    try:
        decoded = decode_lifecycle_event(value)
    except ValueError as error:
        assert str(error)
    else:
        assert isinstance(decoded, dict)


@quick
@given(value=st.binary())
def test_any_bytes_decode_or_raise_value_error(value):
    decodes_or_raises_value_error(value)


@quick
@given(value=json_values)
def test_any_json_decodes_or_raises_value_error(value):
    decodes_or_raises_value_error(json.dumps(value).encode())


@quick
@given(
    name=st.sampled_from(["specversion", "id", "source", "type", "subject", "time",
                          "datacontenttype", "traceparent", "data"]),
    data_name=st.sampled_from(["config_id", "run_id", "instance_id", "fence", "config_version",
                               "reason", "error", "attempt", "retry_in_seconds"]),
    value=json_values,
)
def test_event_with_any_field_replaced_decodes_or_raises_value_error(name, data_name, value):
    decodes_or_raises_value_error(wire(lambda e: e.update({name: value})))
    decodes_or_raises_value_error(wire(lambda e: e["data"].update({data_name: value})))
