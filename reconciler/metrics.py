"""Metrics of one instance, through the OpenTelemetry SDK.

Each instance has its own meter provider with two readers: a Prometheus reader on a
registry of its own (served at `/metrics`) and, when the standard `OTEL_*` variables ask
for it, an OTLP exporter. Labels stay bounded: outcomes, reasons and event types, never a
config id, unless `RECONCILER_METRICS_PER_CONFIG` asks for per-config series of the pull
counters (50,000 configs must not mean 50,000 series by default).

Every counter is touched once at start-up with each of its label values, so that every
outcome appears on a dashboard at zero before it first happens.
"""

from __future__ import annotations

from typing import Callable, Iterable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from reconciler.compare import Action

STOP_REASONS = ("disabled", "deleted", "reconfigured", "reassigned", "lease-lost",
                "lease-expired", "shutdown")


# Reconciles take milliseconds and reactions should too; outages stretch them to minutes.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(
        self,
        *,
        resource: Resource,
        otlp_reader: MetricReader | None = None,
        per_config: bool = False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        if otlp_reader is not None:
            readers.append(otlp_reader)
        self.provider = MeterProvider(resource=resource, metric_readers=readers)
        self.per_config = per_config
        meter = self.provider.get_meter("reconciler")

        self.reconciles = meter.create_counter(
            "reconciler.reconciles", unit="{reconcile}",
            description="Reconciles by the action they took",
        )
        self.reconcile_duration = meter.create_histogram(
            "reconciler.reconcile.duration", unit="s", description="Time one reconcile took",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.action_lag = meter.create_histogram(
            "reconciler.action.lag", unit="s",
            description="From a config record's timestamp to the start or stop it caused",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.runs_started = meter.create_counter(
            "reconciler.runs.started", unit="{run}", description="Runs started")
        self.runs_ended = meter.create_counter(
            "reconciler.runs.ended", unit="{run}",
            description="Runs ended, by event type and stop reason",
        )
        self.pulls = meter.create_counter(
            "reconciler.pulls", unit="{pull}", description="Pulls that ended well")
        self.pull_errors = meter.create_counter(
            "reconciler.pull.errors", unit="{pull}", description="Pulls that failed")
        self.orders = meter.create_counter(
            "reconciler.orders", unit="{order}", description="Orders published")
        self.lease_renewals = meter.create_counter(
            "reconciler.lease.renewals", unit="{lease}", description="Leases renewed")
        self.lease_losses = meter.create_counter(
            "reconciler.lease.losses", unit="{lease}",
            description="Runs stopped because their lease could not be renewed in time",
        )
        self.dlq_records = meter.create_counter(
            "reconciler.dlq.records", unit="{record}", description="Records sent to the DLQ")
        self.rebalances = meter.create_counter(
            "reconciler.rebalances", unit="{rebalance}",
            description="Partition assignments received")
        self._gauges: dict[str, Callable[[], float]] = {}
        for name, description in (
            ("reconciler.runs.running", "Runs this instance is running"),
            ("reconciler.configs.not_running",
             "Enabled configs not running nor in backoff for longer than the threshold"),
            ("reconciler.outbox.depth", "Lifecycle events waiting in the outbox"),
            ("reconciler.partitions.assigned", "Configs-topic partitions assigned here"),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._observe(name)], description=description)
        self._zero_every_outcome()

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Say where an observable gauge reads its value."""
        self._gauges[name] = read

    def _observe(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            read = self._gauges.get(name)
            return [] if read is None else [Observation(read())]

        return callback

    def _zero_every_outcome(self) -> None:
        for action in Action:
            self.reconciles.add(0, {"action": action.value})
        self.reconciles.add(0, {"action": "error"})
        for reason in STOP_REASONS:
            self.runs_ended.add(0, {"type": "stopped", "reason": reason})
        self.runs_ended.add(0, {"type": "failed", "reason": "none"})
        for counter in (self.runs_started, self.pulls, self.pull_errors, self.orders,
                        self.lease_renewals, self.lease_losses, self.dlq_records,
                        self.rebalances):
            counter.add(0)

    def config_labels(self, config_id: str) -> dict[str, str]:
        return {"config_id": config_id} if self.per_config else {}

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


def otlp_metric_reader(*, enabled: bool) -> MetricReader | None:
    """An OTLP/HTTP exporter configured by the standard OTEL_EXPORTER_OTLP_* variables."""
    if not enabled:
        return None
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return PeriodicExportingMetricReader(OTLPMetricExporter())
