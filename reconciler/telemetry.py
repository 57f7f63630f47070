"""OpenTelemetry set-up: a tracer provider so that every run and pull has a real trace context.

Spans are exported only when the standard `OTEL_*` variables ask for an exporter; without
one they still give the `traceparent` values that travel in headers and events.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def telemetry_resource(*, service_name: str, instance_id: str) -> Resource:
    return Resource.create({"service.name": service_name, "service.instance.id": instance_id})


def setup_tracing(*, service_name: str, instance_id: str) -> TracerProvider:
    provider = TracerProvider(
        resource=telemetry_resource(service_name=service_name, instance_id=instance_id)
    )
    trace.set_tracer_provider(provider)
    return provider
