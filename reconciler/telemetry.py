"""OpenTelemetry set-up for traces: a tracer provider, exporting over OTLP when asked.

Spans are exported when the standard variables ask for it: `OTEL_TRACES_EXPORTER=otlp`, or
an `OTEL_EXPORTER_OTLP_ENDPOINT` with no other traces exporter named. The OTLP/HTTP exporter
reads the rest of its `OTEL_EXPORTER_OTLP_*` settings itself. Without an exporter, spans
still give real trace ids to the `traceparent` values that travel in headers and events.

`setup_tracing` is meant to run once per process; a second call (tests run several
instances in one process) keeps the first provider.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from reconciler.settings import Settings


def telemetry_resource(*, service_name: str, instance_id: str) -> Resource:
    return Resource.create({"service.name": service_name, "service.instance.id": instance_id})


def otlp_traces_enabled(settings: Settings) -> bool:
    if settings.otel_traces_exporter is not None:
        return "otlp" in settings.otel_traces_exporter.split(",")
    return settings.otel_exporter_otlp_endpoint is not None


def setup_tracing(settings: Settings) -> TracerProvider:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(
        resource=telemetry_resource(
            service_name=settings.otel_service_name, instance_id=settings.instance_id
        )
    )
    if otlp_traces_enabled(settings):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint
        exporter = (
            OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
            if endpoint else OTLPSpanExporter()
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider
