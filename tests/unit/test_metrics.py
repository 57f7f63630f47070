"""Metric shapes: millisecond buckets for durations, bounded labels."""

from __future__ import annotations

import re

from opentelemetry.sdk.resources import Resource

from reconciler.metrics import Metrics


def bucket(text: str, name: str, le: str) -> float:
    match = re.search(rf'^{name}_bucket{{le="{re.escape(le)}"[^}}]*}} (\S+)$', text, re.M)
    assert match, f"no {name} bucket le={le}"
    return float(match.group(1))


def test_reconcile_durations_of_milliseconds_land_in_millisecond_buckets() -> None:
    metrics = Metrics(resource=Resource.create({}))
    metrics.reconcile_duration.record(0.003)
    metrics.action_lag.record(0.04)
    text = metrics.prometheus_text().decode()
    name = "reconciler_reconcile_duration_seconds"
    assert bucket(text, name, "0.0025") == 0
    assert bucket(text, name, "0.005") == 1
    lag = "reconciler_action_lag_seconds"
    assert bucket(text, lag, "0.025") == 0
    assert bucket(text, lag, "0.05") == 1


def test_per_config_labels_only_when_asked_for() -> None:
    assert Metrics(resource=Resource.create({})).config_labels("shop-1") == {}
    labelled = Metrics(resource=Resource.create({}), per_config=True)
    assert labelled.config_labels("shop-1") == {"config_id": "shop-1"}
