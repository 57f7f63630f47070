"""Smoke test of `python -m bench`: the comparator and one product phase at tiny sizes, on
the test session's broker and database, end with a JSON report of the expected shape.

Timings are not judged here (the machine is shared); only that every figure is there and
makes sense: samples were taken, every config was seen to start, the product had no
overlap, and the unfixed scanner started more workers than there are configs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TINY = [
    "--quick", "--phase", "burst,compare",
    "--burst-configs", "20", "--settle-seconds", "2",
    "--compare-configs", "20", "--compare-samples", "5", "--compare-rate", "10",
    "--compare-seconds", "3", "--compare-idle-seconds", "1", "--scan-seconds", "1",
]


def test_quick_bench_writes_a_report_with_every_figure(endpoints, tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    finished = subprocess.run(
        [sys.executable, "-m", "bench", *TINY, "--output", str(output),
         "--kafka-bootstrap", endpoints["KAFKA_BOOTSTRAP_SERVERS"],
         "--database-url", endpoints["DATABASE_URL"]],
        capture_output=True, text=True, timeout=280,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(output.read_text())

    assert {"machine", "sizes", "phases", "goals", "load_average_1m"} <= set(report)
    assert report["machine"]["nproc"] >= 1

    burst = report["phases"]["burst"]
    for step in ("start", "stop"):
        assert burst[step]["configs"] == 20
        assert burst[step]["observed"] == 20
        assert burst[step]["all_s"] > 0
        assert burst[step]["per_config"]["p50_ms"] <= burst[step]["per_config"]["max_ms"]

    compare = report["phases"]["compare"]
    assert set(compare["systems"]) == {"product", "scanner-fixed", "scanner-unfixed"}
    for name, system in compare["systems"].items():
        reaction = system["reaction"]
        assert reaction["missed"] == 0, name
        assert reaction["start"]["samples"] == 5, name
        assert 0 < reaction["start"]["p50_ms"] <= reaction["start"]["max_ms"], name
        assert system["churn"]["changes"] > 0, name
        assert system["churn"]["converged"], name
        assert system["churn"]["process_cpu_s"] >= 0, name
    systems = compare["systems"]
    assert systems["product"]["churn"]["overlap_pairs"] == 0
    assert systems["scanner-unfixed"]["churn"]["overlap_pairs"] > 0
    assert (systems["scanner-unfixed"]["scanner"]["workers_started"]
            > systems["scanner-fixed"]["scanner"]["workers_started"])
    assert compare["ratios"]["scanner-fixed"]["start_p50_scanner_over_product"] > 0

    assert {goal["goal"] for goal in report["goals"]} >= {"overlaps (product)",
                                                          "median reaction vs scanner"}
