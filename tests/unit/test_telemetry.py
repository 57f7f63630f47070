"""Tracing without an exporter: real `traceparent` values, no spans recorded."""

from __future__ import annotations

from opentelemetry.propagate import extract, inject

from streams.lifecycle import lifecycle_event
from reconciler.settings import Settings
from reconciler.telemetry import tracer_provider

SAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def no_exporter() -> Settings:
    return Settings(OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_ENDPOINT=None)


def test_without_an_exporter_spans_are_not_recorded_but_carry_a_traceparent_events_accept():
    tracer = tracer_provider(no_exporter()).get_tracer(__name__)
    carrier: dict[str, str] = {}

    with tracer.start_as_current_span("create pull.task-events") as span:
        inject(carrier)

    assert not span.is_recording()
    context = span.get_span_context()
    assert context.is_valid
    version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (trace_id, span_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 0x01 == 0  # not sampled
    event = lifecycle_event(
        event_type="pull.task.started", config_id="c1", run_id="r1", instance_id="i1",
        emitter_id="i1", fence=1, config_version=None, traceparent=carrier["traceparent"],
    )
    assert event["traceparent"] == carrier["traceparent"]


def test_without_an_exporter_a_trace_sampled_upstream_stays_sampled_downstream():
    tracer = tracer_provider(no_exporter()).get_tracer(__name__)
    carrier: dict[str, str] = {}

    with tracer.start_as_current_span(
        "process pull.configs", context=extract({"traceparent": SAMPLED_PARENT})
    ):
        with tracer.start_as_current_span("reconcile"):
            inject(carrier)

    assert carrier["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert int(carrier["traceparent"].split("-")[3], 16) & 0x01 == 1


def test_with_an_exporter_every_span_is_recorded():
    settings = Settings(OTEL_TRACES_EXPORTER="otlp",
                        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318")
    provider = tracer_provider(settings)
    try:
        with provider.get_tracer(__name__).start_as_current_span("pull") as span:
            assert span.is_recording()
    finally:
        provider.shutdown()
