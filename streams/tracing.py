"""Trace context on Kafka records, by the OpenTelemetry messaging conventions.

A producer opens a `send <topic>` span (kind PRODUCER) and writes its W3C `traceparent`
into the record's headers; a consumer opens `process <topic>` (kind CONSUMER), parented by
that context for a single record and linked to it. Other services that publish configs do
the same with their own OpenTelemetry SDK: inject the current context into a `traceparent`
header (see `headers_with_context`), and the reconciler's spans join their trace.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, Span, SpanKind

tracer = trace.get_tracer("streams")


def headers_with_context(headers: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The headers plus `traceparent` (and `tracestate`) of the current span."""
    carrier: dict[str, str] = {}
    inject(carrier)
    kept = [(k, v) for k, v in (headers or []) if k not in carrier]
    return kept + [(k, v.encode()) for k, v in carrier.items()]


def context_from_headers(headers: list[tuple[str, bytes]]) -> otel_context.Context:
    carrier = {}
    for name, value in headers:
        if name.lower() in ("traceparent", "tracestate"):
            try:
                carrier[name.lower()] = value.decode("ascii")
            except UnicodeDecodeError:
                continue
    return extract(carrier)


def kafka_attributes(
    *, operation: str, topic: str, key: bytes | str | None = None,
    partition: int | None = None, offset: int | None = None, group: str | None = None,
) -> dict[str, object]:
    attributes: dict[str, object] = {
        "messaging.system": "kafka",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": topic,
    }
    if key is not None:
        attributes["messaging.kafka.message.key"] = (
            key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        )
    if partition is not None:
        attributes["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attributes["messaging.kafka.offset"] = offset
    if group is not None:
        attributes["messaging.consumer.group.name"] = group
    return attributes


@contextlib.contextmanager
def producer_span(
    operation: str, topic: str, *, key: bytes | str | None = None,
    attributes: dict[str, object] | None = None,
) -> Iterator[Span]:
    """`send <topic>` (or `create <topic>` for a message sent later), kind PRODUCER."""
    with tracer.start_as_current_span(
        f"{operation} {topic}",
        kind=SpanKind.PRODUCER,
        attributes={**kafka_attributes(operation=operation, topic=topic, key=key),
                    **(attributes or {})},
    ) as span:
        yield span


@contextlib.contextmanager
def processing_span(
    topic: str, *, headers: list[tuple[str, bytes]], key: bytes | None, partition: int,
    offset: int, group: str,
) -> Iterator[Span]:
    """`process <topic>`, kind CONSUMER: a child of the producer's context, linked to it."""
    parent = context_from_headers(headers)
    producer = trace.get_current_span(parent).get_span_context()
    links = [Link(producer)] if producer.is_valid else []
    with tracer.start_as_current_span(
        f"process {topic}",
        context=parent if producer.is_valid else otel_context.Context(),
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=kafka_attributes(operation="process", topic=topic, key=key,
                                    partition=partition, offset=offset, group=group),
    ) as span:
        yield span
