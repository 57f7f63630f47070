"""OpenTelemetry set-up for traces: a tracer provider, exporting over OTLP when asked.

Spans are exported when the standard variables ask for it: `OTEL_TRACES_EXPORTER=otlp`, or
an `OTEL_EXPORTER_OTLP_ENDPOINT` with no other traces exporter named. The OTLP/HTTP exporter
reads the rest of its `OTEL_EXPORTER_OTLP_*` settings itself. Without an exporter nothing
would read a span, so spans are not recorded (they cost a measurable share of every start,
stop and pull): a `ParentBased(ALWAYS_OFF)` sampler still makes trace and span ids, so the
`traceparent` values that travel in headers and events are real. A trace that arrives
sampled from upstream is recorded as before, so its sampled flag travels on unchanged.

`setup_tracing` is meant to run once per process; a second call (tests run several
instances in one process) keeps the first provider.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler

from reconciler.settings import Settings


# Without an exporter: ids for `traceparent`, no recording for traces that start here.
UNEXPORTED_SAMPLER: Sampler = ParentBased(ALWAYS_OFF)


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
    provider = tracer_provider(settings)
    trace.set_tracer_provider(provider)
    return provider


def tracer_provider(settings: Settings) -> TracerProvider:
    """The provider the settings ask for, not yet made the process's own."""
    exporting = otlp_traces_enabled(settings)
    provider = TracerProvider(
        resource=telemetry_resource(
            service_name=settings.otel_service_name, instance_id=settings.instance_id
        ),
        sampler=None if exporting else UNEXPORTED_SAMPLER,
    )
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint
        exporter = (
            OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
            if endpoint else OTLPSpanExporter()
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def flush_within(work: Callable[[], object], seconds: float) -> None:
    """Run exporter work (a flush, a shutdown), waiting for it `seconds` at most.

    The SDK's flushes export in the calling thread and wait for the exporter's own timeout
    (10 s by default) on an endpoint that does not answer; in a daemon thread that is left
    behind, such work never holds a process's exit."""
    worker = threading.Thread(target=work, daemon=True, name="telemetry-flush")
    worker.start()
    worker.join(max(0.0, seconds))


def flushed(work: Callable[[], object]) -> asyncio.Future:
    """Run exporter work in a daemon thread (see `flush_within`); the future is done when
    the work is."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def target() -> None:
        try:
            work()
        finally:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # the loop closed meanwhile: nobody waits
                pass

    threading.Thread(target=target, daemon=True, name="telemetry-flush").start()
    return done
