"""Traces: one trace from `config put` to the run's start and its lifecycle event, and each
pull a trace of its own, linked to the start, that carries `traceparent` to the source."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind

from reconciler.cli import _publish_configs
from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


def by_name(spans, trace_id: int) -> dict[str, object]:
    return {s.name: s for s in spans if s.context.trace_id == trace_id}


async def test_a_config_put_makes_one_trace_from_the_producer_to_the_lifecycle_event(
    deployment: Deployment, spans,
) -> None:
    await deployment.start_instance()
    topics = deployment.topics
    doc = deployment.doc("c1", interval=0.5)
    import json

    await _publish_configs(deployment.settings, [("c1", json.dumps(doc).encode())])
    started = await wait_for(lambda: deployment.events_of("c1", "started"), timeout=20,
                             what="the started event")

    producer = next(s for s in spans.get_finished_spans()
                    if s.name == f"send {topics.configs}")
    trace_id = producer.context.trace_id

    def whole_trace():
        found = by_name(spans.get_finished_spans(), trace_id)
        wanted = {f"process {topics.configs}", "reconcile", "start", "lease",
                  f"create {topics.task_events}"}
        return found if wanted <= set(found) else None

    found = await wait_for(whole_trace, timeout=10, what="the whole trace")
    process = found[f"process {topics.configs}"]
    reconcile, start, lease = found["reconcile"], found["start"], found["lease"]
    create = found[f"create {topics.task_events}"]
    run_id = started[0]["data"]["run_id"]

    assert producer.kind is SpanKind.PRODUCER
    assert producer.attributes["messaging.system"] == "kafka"
    assert producer.attributes["messaging.destination.name"] == topics.configs
    assert producer.attributes["messaging.kafka.message.key"] == "c1"

    assert process.kind is SpanKind.CONSUMER
    assert process.parent.span_id == producer.context.span_id
    assert [link.context.span_id for link in process.links] == [producer.context.span_id]
    assert process.attributes["messaging.destination.name"] == topics.configs
    assert process.attributes["messaging.consumer.group.name"] == deployment.settings.group_id
    assert process.attributes["messaging.kafka.message.key"] == "c1"
    assert int(process.attributes["messaging.destination.partition.id"]) in range(
        deployment.settings.config_partitions)
    assert process.attributes["messaging.kafka.offset"] >= 0

    assert reconcile.parent.span_id == process.context.span_id
    assert reconcile.attributes["config_id"] == "c1"
    assert start.parent.span_id == reconcile.context.span_id
    assert start.attributes["run_id"] == run_id
    assert lease.parent.span_id == start.context.span_id
    assert lease.attributes["lease.taken"] is True and lease.attributes["fence"] == 1
    assert create.kind is SpanKind.PRODUCER
    assert create.parent.span_id == lease.context.span_id
    assert create.attributes["run_id"] == run_id
    assert create.attributes["messaging.destination.name"] == topics.task_events

    # The event carries the context on: a consumer of task events continues this trace.
    traceparent = started[0]["traceparent"]
    assert traceparent.startswith(f"00-{trace_id:032x}-{create.context.span_id:016x}-")


async def test_each_pull_is_a_trace_of_its_own_linked_to_the_start_and_reaching_the_source(
    deployment: Deployment, spans,
) -> None:
    await deployment.start_instance()
    await deployment.put("c1", interval=0.3)
    started = await wait_for(lambda: deployment.events_of("c1", "started"), timeout=20,
                             what="the started event")
    run_id = started[0]["data"]["run_id"]
    await wait_for(lambda: len([s for s in spans.get_finished_spans() if s.name == "pull"]) >= 2,
                   timeout=20, what="two pulls")

    finished = spans.get_finished_spans()
    start = next(s for s in finished if s.name == "start" and s.attributes["run_id"] == run_id)
    pulls = [s for s in finished if s.name == "pull" and s.attributes["run_id"] == run_id]
    assert len({p.context.trace_id for p in pulls}) == len(pulls)
    for pull in pulls:
        assert pull.parent is None
        assert [link.context.span_id for link in pull.links] == [start.context.span_id]
        assert pull.attributes["config_id"] == "c1"
        gets = [s for s in finished if s.name == "GET" and s.parent is not None
                and s.parent.span_id == pull.context.span_id]
        assert gets and all(g.kind is SpanKind.CLIENT for g in gets)
        assert all(g.attributes["run_id"] == run_id for g in gets)

    first_get = next(s for s in finished if s.name == "GET"
                     and s.parent.span_id == pulls[0].context.span_id)
    sent = f"00-{first_get.context.trace_id:032x}-{first_get.context.span_id:016x}-"
    assert any((r.traceparent or "").startswith(sent)
               for r in deployment.source.requests_for("c1"))
    orders = deployment.orders_of("c1")
    assert orders and all(dict(r.headers).get("traceparent") for r in orders)
