"""`python -m bench`: run the benchmark phases, print a table, write the figures as JSON.

    python -m bench                       # every phase at full size (about half an hour)
    python -m bench --quick               # every phase at smoke-test sizes
    python -m bench --phase reaction,burst --burst-configs 2000
    python -m bench --profile             # py-spy of the instance during burst and capacity

Phases: reaction, burst, churn, capacity, pullrate, compare (see `bench.phases` and
`bench.compare`). The stack is started in `.stack-bench/` on Kafka 49192, controller 49193
and PostgreSQL 55532, and stopped at the end unless `--keep-stack`; `--kafka-bootstrap`
with `--database-url` uses servers that run already and stops nothing. Results go to
`bench/results/<UTC timestamp>.json` (or `--output`); logs of the processes a run started
to `.stack-bench/logs/<timestamp>/`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench import compare as comparator
from bench import phases
from bench.deployment import Context
from bench.phases import QUICK, Sizes
from bench.stack import BenchStack
from reconciler.localstack import project_root

log = logging.getLogger("bench")

PHASES = ("reaction", "burst", "churn", "capacity", "pullrate", "compare")
RESULTS = project_root() / "bench" / "results"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default=",".join(PHASES),
                        help=f"comma-separated phases to run, in this order: {','.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--keep-stack", action="store_true",
                        help="leave the benchmark's Kafka and PostgreSQL running afterwards")
    parser.add_argument("--kafka-bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--database-url", help="use this PostgreSQL (a database the run may "
                        "create databases from) instead of starting one")
    parser.add_argument("--output", type=Path, help="where the JSON goes")
    parser.add_argument("--profile", action="store_true",
                        help="record the instance with py-spy during burst and capacity")
    parser.add_argument("--instance-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a RECONCILER_* variable for every product instance, e.g. "
                        "RECONCILER_WORKERS=32 (repeatable)")
    defaults = Sizes()
    for field in dataclasses.fields(Sizes):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, tuple):
            parser.add_argument(flag, type=lambda text: tuple(int(v) for v in text.split(",")),
                                help=f"comma-separated (default {','.join(map(str, default))})")
        else:
            parser.add_argument(flag, type=type(default), help=f"default {default:g}"
                                + (f", quick {QUICK[field.name]:g}"
                                   if field.name in QUICK else ""))
    arguments = parser.parse_args(argv)
    if bool(arguments.kafka_bootstrap) != bool(arguments.database_url):
        parser.error("--kafka-bootstrap and --database-url go together")
    for setting in arguments.instance_setting:
        name, equals, _ = setting.partition("=")
        if not equals or not name.startswith("RECONCILER_"):
            parser.error(f"--instance-setting {setting!r}: expected RECONCILER_<NAME>=<value>")
    unknown = set(arguments.phase.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(PHASES)}")
    return arguments


def sizes_from(arguments: argparse.Namespace) -> Sizes:
    sizes = Sizes(**(QUICK if arguments.quick else {}))
    for field in dataclasses.fields(Sizes):
        given = getattr(arguments, field.name)
        if given is not None:
            setattr(sizes, field.name, given)
    return sizes


class LoadWatch:
    """The 1-minute load average every few seconds, per phase."""

    def __init__(self) -> None:
        self.phase = "start"
        self.samples: dict[str, list[float]] = {}
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            self.samples.setdefault(self.phase, []).append(os.getloadavg()[0])
            await asyncio.sleep(5.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict:
        return {phase: {"min": round(min(v), 2), "mean": round(sum(v) / len(v), 2),
                        "max": round(max(v), 2)}
                for phase, v in self.samples.items() if v}


def machine() -> dict:
    memory = psutil.virtual_memory()
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip()
                     for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(memory.total / 1024 ** 3, 1),
        "python": platform.python_version(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(),
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


async def run_phases(arguments: argparse.Namespace, sizes: Sizes, stamp: str,
                     save: Callable[[dict], None]) -> dict:
    """Run the chosen phases in order; `save` gets the figures so far after each one, so a
    long run that is stopped keeps what it measured."""
    stack = BenchStack(kafka_bootstrap=arguments.kafka_bootstrap,
                       database_url=arguments.database_url)
    endpoints = await asyncio.to_thread(stack.up)
    logs = stack.root / "logs" / stamp
    context = Context(stack=stack, endpoints=endpoints, logs=logs, label=stamp[-6:].lower(),
                      instance_settings=instance_settings(arguments))
    profile_dir = logs / "profiles" if arguments.profile else None
    load = LoadWatch()
    load.start()
    results: dict = {}
    try:
        for name in [p for p in PHASES if p in arguments.phase.split(",")]:
            load.phase = name
            began = time.monotonic()
            log.info("phase %s", name)
            try:
                results[name] = await run_phase(name, context, sizes, profile_dir)
            except Exception as error:
                log.exception("phase %s failed", name)
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            results[name]["phase_seconds"] = round(time.monotonic() - began, 1)
            load.samples.setdefault(name, []).append(os.getloadavg()[0])
            save({"phases": results, "load_average_1m": load.summary(), "logs": str(logs)})
    finally:
        load.stop()
        if not arguments.keep_stack:
            await asyncio.to_thread(stack.down)
    return {"phases": results, "load_average_1m": load.summary(), "logs": str(logs)}


async def run_phase(name: str, context: Context, sizes: Sizes, profile_dir) -> dict:
    if name == "reaction":
        return await phases.reaction(context, sizes)
    if name == "burst":
        return await phases.burst(context, sizes, profile_dir=profile_dir)
    if name == "churn":
        return await phases.churn(context, sizes)
    if name == "capacity":
        return await phases.capacity(context, sizes, profile_dir=profile_dir)
    if name == "pullrate":
        return await phases.pull_rate(context, sizes)
    return await comparator.compare(context, sizes)


# ---- goals and the table -----------------------------------------------------------------


def goals(results: dict) -> list[dict]:
    """The benchmark's goals, each with what was measured and whether it was met."""
    found = []

    def goal(name: str, target: str, measured, met: bool | None) -> None:
        found.append({"goal": name, "target": target, "measured": measured, "met": met})

    reaction = results.get("reaction", {})
    idle = reaction.get("idle", {}).get("start")
    if idle:
        goal("reaction p50, idle", "< 20 ms", idle["p50_ms"],
             idle["p50_ms"] is not None and idle["p50_ms"] < 20)
        goal("reaction p99, idle", "< 100 ms", idle["p99_ms"],
             idle["p99_ms"] is not None and idle["p99_ms"] < 100)
    burst = results.get("burst", {}).get("start")
    if burst:
        goal(f"burst of {burst['configs']:,} converged", "< 3 s", burst["all_s"],
             burst["all_s"] is not None and burst["all_s"] < 3)
    capacity = results.get("capacity", {})
    if "rss_mib" in capacity:
        per_loop = capacity["rss_per_loop_kib"]
        projected = round(per_loop * 50_000 / 1024 + capacity["rss_mib"]["empty"], 1)
        loops = capacity.get("running_at_measurement", capacity["configs"])
        goal(f"50,000 loops resident ({loops:,} measured, projected)", "< 1024 MiB",
             projected, projected < 1024)
    overlaps = []
    if "overlap_pairs" in results.get("churn", {}):
        overlaps.append(results["churn"]["overlap_pairs"])
    product = results.get("compare", {}).get("systems", {}).get("product")
    if product:
        overlaps.append(product["churn"]["overlap_pairs"])
    if overlaps:
        goal("overlaps (product)", "0", sum(overlaps), sum(overlaps) == 0)
    ratios = results.get("compare", {}).get("ratios", {}).get("scanner-fixed")
    if ratios:
        value = ratios["start_p50_scanner_over_product"]
        goal("median reaction vs scanner", ">= 100x faster", value,
             value is not None and value >= 100)
    return found


def rows(results: dict) -> list[tuple[str, str, str]]:
    """(phase, figure, value) lines for the table."""
    out: list[tuple[str, str, str]] = []

    def lat(summary: dict | None) -> str:
        if not summary or not summary.get("samples"):
            return "no samples"
        return (f"p50 {summary['p50_ms']:,.1f}  p90 {summary['p90_ms']:,.1f}  p99 "
                f"{summary['p99_ms']:,.1f}  max {summary['max_ms']:,.1f} ms  "
                f"(n={summary['samples']})")

    for phase, result in results.items():
        if "error" in result:
            out.append((phase, "error", result["error"]))
            continue
        if phase == "reaction":
            for load in ("idle", "loaded"):
                part = result[load]
                label = load if load == "idle" else f"{part['running_beside']:,} running"
                out.append((phase, f"enable → started, {label}", lat(part["start"])))
                out.append((phase, f"disable → stopped, {label}", lat(part["stop"])))
        elif phase == "burst":
            for step in ("start", "stop"):
                part = result[step]
                pipe = part["pipeline"]
                out.append((phase, f"{part['configs']:,} {step}: all seen after",
                            f"{part['all_s']} s (publish {part['publish_s']} s, instance CPU "
                            f"{part['instance_cpu_s']} s, seen {part['observed']:,})"))
                out.append((phase, f"{step}: stages done at", (
                    f"desired written {pipe['desired_written_s']} s, runs recorded "
                    f"{pipe['runs_recorded_s']} s, events seen {part['all_s']} s; "
                    f"{pipe['commits_per_config']} commits/config")))
        elif phase == "churn":
            out.append((phase, "changes", f"{result['changes']:,} in {result['seconds']} s "
                        f"({result['achieved_per_second']}/s) over {result['configs']:,}"))
            out.append((phase, "lag to started", lat(result["start_lag"])))
            out.append((phase, "lag to stopped", lat(result["stop_lag"])))
            out.append((phase, "convergence after last change",
                        f"{result['convergence_s']} s"))
            out.append((phase, "overlaps at the source", str(result["overlap_pairs"])))
        elif phase == "capacity":
            out.append((phase, "runs held / asked for",
                        f"{result['running_at_measurement']:,} / {result['configs']:,} "
                        f"(lease losses {result['lease_losses']})"))
            out.append((phase, f"{result['running_at_measurement']:,} loops: resident",
                        f"{result['rss_mib']['running']} MiB (empty "
                        f"{result['rss_mib']['empty']} MiB), {result['rss_per_loop_kib']} "
                        f"KiB per loop"))
            out.append((phase, "start of all", f"{result['start']['all_s']} s"))
            cpu = result["cpu_percent_of_a_core"]
            out.append((phase, "idle CPU of the instance",
                        f"{cpu['with_loops']} % of a core (empty: {cpu['empty']} %)"))
            out.append((phase, "lease renewal statement",
                        lat(result["lease_renewal"]["statement_ms"])))
            out.append((phase, "shutdown", f"{result['shutdown_s']} s"))
        elif phase == "pullrate":
            for step in result["steps"]:
                cpu = step["cpu_percent_of_a_core"]
                out.append((phase, f"{step['configs']:,} configs @ {result['interval_s']} s",
                            f"{step['pulls_per_second']} pulls/s, "
                            f"{step['instance_cpu_ms_per_pull']} ms CPU/pull; CPU % instance "
                            f"{cpu['instance']} source {cpu['source']} kafka {cpu['kafka']} "
                            f"postgres {cpu['postgres']}"))
        elif phase == "compare":
            for name, system in result["systems"].items():
                churn = system["churn"]
                out.append((phase, f"{name}: enable → started", lat(system["reaction"]["start"])))
                out.append((phase, f"{name}: disable → stopped", lat(system["reaction"]["stop"])))
                out.append((phase, f"{name}: churn", (
                    f"overlaps {churn['overlap_pairs']} ({churn['overlapping_configs']} configs),"
                    f" CPU {churn['process_cpu_s']} s + postgres {churn['postgres_cpu_s']} s, "
                    f"idle CPU {churn['idle']['process_cpu_percent']} %, converged "
                    f"{churn['convergence_s']} s")))
            for name, values in result["ratios"].items():
                out.append((phase, f"ratio vs {name}", (
                    f"median start {values['start_p50_scanner_over_product']}x faster, "
                    f"stop {values['stop_p50_scanner_over_product']}x; CPU product/scanner "
                    f"churn {values['churn_cpu_product_over_scanner']}, idle "
                    f"{values['idle_cpu_product_over_scanner']}")))
        if "phase_seconds" in result:
            out.append((phase, "phase took", f"{result['phase_seconds']} s"))
    return out


def print_table(report: dict) -> None:
    lines = rows(report["phases"])
    width = max((len(figure) for _, figure, _ in lines), default=10)
    print()
    current = None
    for phase, figure, value in lines:
        if phase != current:
            print(f"== {phase}")
            current = phase
        print(f"  {figure:<{width}}  {value}")
    if report["goals"]:
        print("== goals")
        for goal in report["goals"]:
            verdict = {True: "met", False: "NOT met", None: "?"}[goal["met"]]
            print(f"  {goal['goal']:<{width}}  {goal['target']}: {goal['measured']} ({verdict})")
    machine_info = report["machine"]
    print(f"== machine: {machine_info['nproc']} cores, {machine_info['ram_gib']} GiB, load "
          f"average (1 min) per phase {report['load_average_1m']}")


def instance_settings(arguments: argparse.Namespace) -> dict[str, str]:
    return dict(setting.split("=", 1) for setting in arguments.instance_setting)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    sizes = sizes_from(arguments)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "started": stamp,
        "commit": git_commit(),
        "quick": arguments.quick,
        "phases_asked": arguments.phase.split(","),
        "sizes": dataclasses.asdict(sizes),
        "machine": machine(),
        "instance_settings": instance_settings(arguments),
    }
    output = arguments.output or RESULTS / f"{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(figures: dict) -> None:
        report.update(figures)
        report["goals"] = goals(report["phases"])
        report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
        output.write_text(json.dumps(report, indent=2) + "\n")

    save(asyncio.run(run_phases(arguments, sizes, stamp, save)))
    print_table(report)
    print(f"\nresults: {output}")
    return 1 if any("error" in result for result in report["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
