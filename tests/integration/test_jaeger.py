"""The local stack's Jaeger, started for real: a span sent over OTLP/HTTP is found again
through Jaeger's HTTP query API.

Skipped unless RECONCILER_TEST_JAEGER=1, so that CI may leave them out: the first run builds
Jaeger with Go from `infra/jaeger/` (several minutes on two cores, and the Go module proxy
must be reachable). Only the check of the message for a missing Go runs always, as it needs
neither Go nor a build. The stack lives under a temporary folder, on free ports of its own
for Kafka, PostgreSQL and Jaeger, so it never meets `reconciler dev up`'s stack. With
RECONCILER_TEST_STACK=<kafka>,<controller>,<postgres> it is that stack instead (in
`.stack-<kafka>/`, as for the other integration tests), with Jaeger on its default ports, so
the binary built there is kept for the next run.

The helpers (`send_span`, `find_trace`, `services`) take the stack's addresses as arguments,
so a test that runs the demo against this stack can use them as they are. The tests share
the module's stack and run in file order; the last one takes it down.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any

import psutil
import pytest

from reconciler.localstack import (
    GO_BUILD_SECONDS,
    JaegerPorts,
    LocalStack,
    StackError,
    project_root,
)

pytestmark = [pytest.mark.integration, pytest.mark.jaeger]

needs_jaeger = pytest.mark.skipif(
    os.environ.get("RECONCILER_TEST_JAEGER") != "1",
    reason="builds and runs Jaeger; set RECONCILER_TEST_JAEGER=1 to run",
)

TRACE_WAIT_SECONDS = 15.0


def free_jaeger_ports() -> JaegerPorts:
    return JaegerPorts(
        otlp_grpc=free_port(), otlp_http=free_port(), query_http=free_port(),
        query_grpc=free_port(),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5.0) as response:
        return json.load(response)


def send_span(
    otlp_http_endpoint: str, *, service: str, operation: str, attributes: dict[str, str]
) -> str:
    """Sends one span through the SDK's OTLP/HTTP exporter; returns its trace id in hex.

    A provider of its own, so that the process-wide one of the other tests stays as it is.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=f"{otlp_http_endpoint}/v1/traces", timeout=10)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with provider.get_tracer(__name__).start_as_current_span(
            operation, attributes=attributes
        ) as span:
            trace_id = span.get_span_context().trace_id
    finally:
        provider.shutdown()
    return f"{trace_id:032x}"


def get_page(url: str) -> tuple[str, str]:
    """The content type and the text of the page at `url`."""
    with urllib.request.urlopen(url, timeout=5.0) as response:
        return response.headers.get_content_type(), response.read().decode(errors="replace")


def services(query_url: str) -> list[str]:
    """The service names Jaeger has seen."""
    return get_json(f"{query_url}/api/services")["data"] or []


def find_trace(
    query_url: str,
    service: str,
    operation: str,
    *,
    having: Collection[str] = (),
    timeout: float = TRACE_WAIT_SECONDS,
) -> dict[str, Any]:
    """The newest trace of `service` with a span named `operation`, waiting for it to arrive.

    With `having`, only a trace that also has spans of all those names counts. Spans reach
    the store through the collector's batch processor, so a trace sent a moment ago may not
    be found at the first ask. Fails the test when none arrives in `timeout`.
    """
    query = urllib.parse.urlencode(
        {"service": service, "operation": operation, "lookback": "1h", "limit": 200}
    )
    deadline = time.monotonic() + timeout
    while True:
        traces = [
            trace for trace in get_json(f"{query_url}/api/traces?{query}")["data"] or []
            if set(having) <= {span["operationName"] for span in trace["spans"]}
        ]
        if traces:
            return max(traces, key=lambda t: max(s["startTime"] for s in t["spans"]))
        if time.monotonic() > deadline:
            pytest.fail(f"no trace of {service!r} with a span {operation!r}"
                        f"{f' and {sorted(having)}' if having else ''} in {timeout:.0f} s")
        time.sleep(0.25)


def find_operation(
    query_url: str, service: str, matches: Callable[[str], bool], *,
    timeout: float = TRACE_WAIT_SECONDS,
) -> str:
    """The name of an operation of `service` that `matches`, waiting for its spans to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        found = get_json(f"{query_url}/api/operations?service={service}")["data"] or []
        names = sorted(name for name in {o["name"] for o in found} if matches(name))
        if names:
            return names[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no such operation of {service!r} in {timeout:.0f} s")
        time.sleep(0.25)


def jaeger_pid(stack: LocalStack) -> int:
    return int((stack.root / "jaeger" / "jaeger.pid").read_text().split()[0])


def span_named(trace: dict[str, Any], operation: str) -> dict[str, Any]:
    return next(span for span in trace["spans"] if span["operationName"] == operation)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    ports = os.environ.get("RECONCILER_TEST_STACK")
    if ports:
        kafka, controller, postgres = (int(p) for p in ports.split(","))
        stack = LocalStack(root=project_root() / f".stack-{kafka}", kafka_port=kafka,
                           kafka_controller_port=controller, postgres_port=postgres)
    else:
        stack = LocalStack(
            root=tmp_path_factory.mktemp("stack"),
            kafka_port=free_port(),
            kafka_controller_port=free_port(),
            postgres_port=free_port(),
            jaeger_ports=free_jaeger_ports(),
        )
    was_running = stack.is_running()
    yield stack
    if was_running:
        # The session's other tests may still need the broker and the database it had.
        stack.stop_jaeger()
        stack.up()
    else:
        stack.down()


def test_start_jaeger_without_go_on_the_path_asks_for_go_and_starts_nothing(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "module"
    module.mkdir()
    (module / "go.mod").write_bytes((project_root() / "infra" / "jaeger" / "go.mod").read_bytes())
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    stack = LocalStack(
        root=tmp_path / "stack", jaeger_ports=free_jaeger_ports(), jaeger_module=module
    )

    with pytest.raises(StackError) as refusal:
        stack.start_jaeger()

    assert "Go is needed once to build the local Jaeger (go not found on PATH)" in str(
        refusal.value
    )
    assert "\n" not in str(refusal.value)
    assert not (tmp_path / "stack" / "jaeger" / "jaeger.pid").exists()


@needs_jaeger
# This test brings the stack up, which may include a first build of Jaeger.
@pytest.mark.timeout(GO_BUILD_SECONDS + 300)
def test_up_with_jaeger_points_the_environment_at_its_otlp_receiver(stack: LocalStack) -> None:
    stack.up(with_jaeger=True, progress=print)

    environment = stack.env()

    assert stack.jaeger_is_running()
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        f"http://127.0.0.1:{stack.jaeger_ports.otlp_http}"
    )
    assert environment["OTEL_TRACES_EXPORTER"] == "otlp"
    # Jaeger takes traces only: metrics sent there would be refused.
    assert environment["OTEL_METRICS_EXPORTER"] == "none"


@needs_jaeger
def test_up_with_jaeger_again_keeps_the_process_and_the_binary(stack: LocalStack) -> None:
    binary = stack.root / "jaeger" / "bin" / "jaeger"
    pid, built = jaeger_pid(stack), binary.stat().st_mtime_ns

    stack.up(with_jaeger=True)

    assert (jaeger_pid(stack), binary.stat().st_mtime_ns) == (pid, built)


@needs_jaeger
def test_a_span_sent_over_otlp_http_is_found_through_the_query_api(stack: LocalStack) -> None:
    service = f"test-{uuid.uuid4().hex[:8]}"
    endpoint = stack.env()["OTEL_EXPORTER_OTLP_ENDPOINT"]

    trace_id = send_span(
        endpoint, service=service, operation="process pull.configs",
        attributes={"config_id": "shop-42.sku-7"},
    )
    trace = find_trace(stack.jaeger_query_url, service, "process pull.configs")

    span = span_named(trace, "process pull.configs")
    tags = {tag["key"]: tag["value"] for tag in span["tags"]}
    assert trace["traceID"] == trace_id
    assert trace["processes"][span["processID"]]["serviceName"] == service
    assert tags["config_id"] == "shop-42.sku-7"
    assert service in services(stack.jaeger_query_url)


@needs_jaeger
def test_jaeger_listens_on_the_loopback_address_only(stack: LocalStack) -> None:
    pid = jaeger_pid(stack)

    listening = {
        (connection.laddr.ip, connection.laddr.port)
        for connection in psutil.Process(pid).net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    }

    ports = stack.jaeger_ports
    assert listening == {
        ("127.0.0.1", port)
        for port in (ports.otlp_grpc, ports.otlp_http, ports.query_http, ports.query_grpc)
    }


@needs_jaeger
@pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="no package registry reachable here ships a built Jaeger UI (see the README's "
    "Jaeger section), so the Jaeger built from the Go module serves its placeholder page",
)
def test_the_query_port_serves_the_real_jaeger_ui(stack: LocalStack) -> None:
    content_type, page = get_page(f"{stack.jaeger_query_url}/")

    assert content_type == "text/html"
    assert "not the Jaeger UI you are looking for" not in page, "Jaeger's placeholder page"
    assert '<div id="jaeger-ui-root">' in page
    scripts = re.findall(r'<script[^>]+src="\.?/?(static/[^"]+\.js)"', page)
    assert scripts, "no script of the UI on its page"
    for script in scripts:
        content_type, _ = get_page(f"{stack.jaeger_query_url}/{script}")
        assert content_type in {"text/javascript", "application/javascript"}, script


@needs_jaeger
@pytest.mark.timeout(600)
def test_the_demo_trace_of_a_config_change_is_found_with_its_spans(stack: LocalStack) -> None:
    import subprocess
    import sys

    environment = {**os.environ, **stack.env(), "OTEL_SERVICE_NAME": "reconciler-demo-test"}
    demo = subprocess.run([sys.executable, "-m", "reconciler.cli", "demo"], env=environment,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "Failed to export" not in demo.stderr, demo.stderr[-2000:]

    # The demo publishes configs as another service without tracing would, with no trace
    # context in the record: a config change's trace begins at the instance's process span.
    query_url, service = stack.jaeger_query_url, "reconciler-demo-test"
    process = find_operation(
        query_url, service, lambda name: name.startswith("process ") and name.endswith(".configs")
    )
    change = find_trace(query_url, service, process, having={"reconcile", "start", "lease"})
    start = span_named(change, "start")
    run_id = next(tag["value"] for tag in start["tags"] if tag["key"] == "run_id")

    pull = find_trace(query_url, service, "pull", having={"GET"})
    assert any(tag["key"] == "run_id" for tag in span_named(pull, "pull")["tags"])
    assert run_id


@needs_jaeger
def test_down_stops_jaeger_and_takes_the_exporter_out_of_the_environment(
    stack: LocalStack,
) -> None:
    pid = jaeger_pid(stack)

    stack.down()

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not stack.jaeger_is_running()
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in stack.env()
