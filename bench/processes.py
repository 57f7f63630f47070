"""The processes a phase starts: the system under test and the sample order source.

Each runs in a process of its own so that its CPU time and resident memory can be read
with psutil without the benchmark's own work in them. They are stopped by the pid this
module started, SIGTERM first, SIGKILL after a bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from reconciler.localstack import project_root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Spawned:
    """One process started by the benchmark."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    process: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.process = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def rss_bytes(self) -> int:
        return self.process.memory_info().rss

    def alive(self) -> bool:
        return self.popen.poll() is None

    async def stop(self, *, timeout: float = 60.0) -> float | None:
        """SIGTERM, then SIGKILL after `timeout`; the seconds a graceful stop took, or None
        when it had to be killed (or had already ended)."""
        if not self.alive():
            return None
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.popen.wait, timeout)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.popen.kill()
            await asyncio.to_thread(self.popen.wait, 30)
            return None


def _spawn(name: str, arguments: list[str], *, env: dict[str, str], logs: Path) -> Spawned:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(
            [sys.executable, *arguments], env=env, cwd=project_root(),
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    return Spawned(name, popen, log_path)


def _base_environment() -> dict[str, str]:
    """This process's environment without anything that points a reconciler or an
    OpenTelemetry SDK elsewhere."""
    return {
        name: value for name, value in os.environ.items()
        if not name.startswith(("KAFKA_", "RECONCILER_", "OTEL_", "DATABASE_URL"))
    }


def spawn_instance(*, name: str, kafka: str, database_url: str, prefix: str, http_port: int,
                   logs: Path, settings: dict[str, str] | None = None) -> Spawned:
    """`reconciler run`, exactly as an operator starts it, with the contract's variables."""
    env = {
        **_base_environment(),
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "DATABASE_URL": database_url,
        "RECONCILER_TOPIC_PREFIX": prefix,
        "RECONCILER_INSTANCE_ID": name,
        "RECONCILER_HTTP_PORT": str(http_port),
        **(settings or {}),
    }
    return _spawn(name, ["-m", "reconciler.cli", "run"], env=env, logs=logs)


def spawn_source(*, name: str, port: int, control_port: int, rate: float, logs: Path) -> Spawned:
    return _spawn(
        name,
        ["-m", "bench.source_server", "--port", str(port), "--control-port",
         str(control_port), "--rate", repr(rate)],
        env=_base_environment(), logs=logs,
    )


def spawn_scanner(*, name: str, variant: str, kafka: str, database_url: str, prefix: str,
                  scan_seconds: float, stats_path: Path, logs: Path) -> Spawned:
    return _spawn(
        name,
        ["-m", "bench.scanner", "--variant", variant, "--kafka", kafka,
         "--database-url", database_url, "--prefix", prefix,
         "--scan-seconds", repr(scan_seconds), "--stats", str(stats_path)],
        env=_base_environment(), logs=logs,
    )


async def wait_http_ok(url: str, *, timeout: float, process: Spawned) -> None:
    """Poll `url` until it answers 200; fail early when the process has ended."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if not process.alive():
                raise RuntimeError(f"{process.name} ended before it was ready; see "
                                   f"{process.log_path}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as answer:
                    if answer.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} was not ready at {url} within {timeout:.0f} s;"
                                   f" see {process.log_path}")
            await asyncio.sleep(0.2)


async def get_json(url: str, *, timeout: float = 120.0) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
            answer.raise_for_status()
            return json.loads(await answer.text())


async def get_text(url: str, *, timeout: float = 30.0) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
            answer.raise_for_status()
            return await answer.text()


class CpuMeter:
    """CPU seconds of a set of processes between `start` and `read`.

    The processes of a server (PostgreSQL's backends) come and go; children of a listed
    process are found afresh at each reading, and one that ended in between is counted up
    to its last reading.
    """

    def __init__(self, roots: list[psutil.Process], *, children: bool = False) -> None:
        self._roots = roots
        self._children = children
        self._start: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        found: dict[int, float] = {}
        for root in self._roots:
            members = [root]
            if self._children:
                try:
                    members += root.children(recursive=True)
                except psutil.Error:
                    pass
            for member in members:
                try:
                    times = member.cpu_times()
                    found[member.pid] = times.user + times.system
                except psutil.Error:
                    continue
        return found

    def start(self) -> "CpuMeter":
        self._start = self._sample()
        return self

    def read(self) -> float:
        now = self._sample()
        return sum(value - self._start.get(pid, 0.0) for pid, value in now.items())
