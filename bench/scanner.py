"""The comparator: the timer-and-scan design the product replaced, as a process of its own.

Every `--scan-seconds` (5 by default) one scan reads the enabled configs from the
`scanner_configs` table and starts a worker for each one that is not running; a worker is
an asyncio task that pulls its config's orders from the HTTP source every interval (the
same requests as the product's, with `X-Pull-Config-Id` and `X-Pull-Run-Id`, so that the
sample source's overlap detector sees its workers), publishes them to
`<p>.scanner-orders` and saves its cursor in the table. A config that is no longer enabled
has its worker cancelled by the next scan. Starts and stops are published to
`<p>.scanner-events` as `{"type": "started" | "stopped", "subject": …, "run_id": …}`, so
the benchmark observes this design through the same path as the product's lifecycle events.

Two variants:

- `fixed`: the registry of workers keyed by config is consulted before a start (the usual
  fix): one worker per config, and a change waits for the next scan.
- `unfixed`: no running check. Every scan starts a new worker for every enabled config and
  overwrites the registry entry, so the earlier worker's handle is lost: it leaks, keeps
  pulling beside the new one, and disabling the config stops only the newest worker.

On SIGTERM the scanner writes what it did (scans, their durations, workers started and
still alive) as JSON to `--stats` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
import uuid

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

log = logging.getLogger("bench.scanner")

SCHEMA = """
CREATE TABLE IF NOT EXISTS scanner_configs (
    config_id         text PRIMARY KEY,
    enabled           boolean NOT NULL,
    channel_id        text NOT NULL,
    product_id        text NOT NULL,
    interval_seconds  double precision NOT NULL,
    url               text NOT NULL,
    version           bigint NOT NULL DEFAULT 0,
    cursor            text,
    updated_at        timestamptz NOT NULL DEFAULT now()
)
"""

REQUEST_TIMEOUT_SECONDS = 10.0


async def ensure_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(SCHEMA)


class Scanner:
    def __init__(self, *, variant: str, pool: asyncpg.Pool, producer: AIOKafkaProducer,
                 session: aiohttp.ClientSession, prefix: str, scan_seconds: float) -> None:
        self._variant = variant
        self._pool = pool
        self._producer = producer
        self._session = session
        self._events_topic = f"{prefix}.scanner-events"
        self._orders_topic = f"{prefix}.scanner-orders"
        self._scan_seconds = scan_seconds
        # Config id → the worker task the scanner knows of; in `unfixed`, not all of them.
        self.registry: dict[str, asyncio.Task] = {}
        self.workers: set[asyncio.Task] = set()
        self.started = 0
        self.scan_durations: list[float] = []

    async def scan_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("scan failed (%s); next scan in %.1f s", error, self._scan_seconds)
            self.scan_durations.append(loop.time() - began)
            await asyncio.sleep(max(0.0, began + self._scan_seconds - loop.time()))

    async def scan(self) -> None:
        rows = await self._pool.fetch(
            "SELECT config_id, channel_id, product_id, interval_seconds, url, cursor"
            " FROM scanner_configs WHERE enabled"
        )
        enabled = {row["config_id"] for row in rows}
        for row in rows:
            known = self.registry.get(row["config_id"])
            if self._variant == "fixed" and known is not None and not known.done():
                continue
            self.registry[row["config_id"]] = self._start(dict(row))
        # Disabled configs: only the worker the registry still knows of is stopped.
        for config_id in [c for c in self.registry if c not in enabled]:
            self.registry.pop(config_id).cancel()

    def _start(self, config: dict) -> asyncio.Task:
        run_id = uuid.uuid4().hex
        task = asyncio.create_task(self._work(config, run_id), name=f"worker:{run_id}")
        self.workers.add(task)
        task.add_done_callback(self.workers.discard)
        self.started += 1
        return task

    async def _work(self, config: dict, run_id: str) -> None:
        config_id = config["config_id"]
        await self._event("started", config_id, run_id)
        cursor = config["cursor"]
        loop = asyncio.get_running_loop()
        try:
            while True:
                began = loop.time()
                cursor = await self._pull(config, run_id, cursor)
                await asyncio.sleep(max(0.0, began + config["interval_seconds"] - loop.time()))
        except asyncio.CancelledError:
            asyncio.create_task(self._event("stopped", config_id, run_id))
            raise
        except Exception as error:
            log.warning("worker of %s failed: %s", config_id, error)
            await self._event("failed", config_id, run_id)

    async def _pull(self, config: dict, run_id: str, cursor: str | None) -> str | None:
        headers = {"X-Pull-Config-Id": config["config_id"], "X-Pull-Run-Id": run_id}
        while True:
            params = {"channel_id": config["channel_id"], "product_id": config["product_id"]}
            if cursor is not None:
                params["cursor"] = cursor
            async with self._session.get(
                config["url"], params=params, headers=headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
            ) as answer:
                answer.raise_for_status()
                page = await answer.json()
            orders = page["orders"]
            if not orders:
                return cursor
            futures = [
                await self._producer.send(
                    self._orders_topic,
                    key=f"{config['channel_id']}:{order['id']}".encode(),
                    value=json.dumps(order, separators=(",", ":")).encode(),
                )
                for order in orders
            ]
            await asyncio.gather(*futures)
            cursor = page["next_cursor"]
            await self._pool.execute(
                "UPDATE scanner_configs SET cursor = $2 WHERE config_id = $1",
                config["config_id"], cursor,
            )

    async def _event(self, kind: str, config_id: str, run_id: str) -> None:
        value = json.dumps({"type": kind, "subject": config_id, "run_id": run_id,
                            "time": time.time()}).encode()
        try:
            await self._producer.send_and_wait(self._events_topic, key=config_id.encode(),
                                               value=value)
        except Exception as error:
            log.warning("could not publish %s of %s: %s", kind, config_id, error)

    def stats(self) -> dict:
        durations = sorted(self.scan_durations)
        return {
            "variant": self._variant,
            "scans": len(durations),
            "scan_p50_ms": round(durations[len(durations) // 2] * 1000, 2) if durations else None,
            "scan_max_ms": round(durations[-1] * 1000, 2) if durations else None,
            "workers_started": self.started,
            "workers_alive": sum(1 for task in self.workers if not task.done()),
            "registry_size": len(self.registry),
        }


async def run(arguments: argparse.Namespace) -> None:
    pool = await asyncpg.create_pool(arguments.database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await ensure_schema(conn)
    producer = AIOKafkaProducer(bootstrap_servers=arguments.kafka, acks="all", linger_ms=2)
    await producer.start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    scanner = Scanner(variant=arguments.variant, pool=pool, producer=producer,
                      session=session, prefix=arguments.prefix,
                      scan_seconds=arguments.scan_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scanning = asyncio.create_task(scanner.scan_forever())
    await stop.wait()
    scanning.cancel()
    with open(arguments.stats, "w") as handle:
        json.dump(scanner.stats(), handle)
    for task in list(scanner.workers):
        task.cancel()
    await asyncio.wait([scanning, *scanner.workers], timeout=5.0)
    await session.close()
    await asyncio.wait_for(producer.stop(), 10.0)
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["fixed", "unfixed"], required=True)
    parser.add_argument("--kafka", required=True, help="bootstrap servers")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--prefix", required=True, help="topic prefix")
    parser.add_argument("--scan-seconds", type=float, default=5.0)
    parser.add_argument("--stats", required=True, help="file the JSON stats go to at exit")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run(arguments))


if __name__ == "__main__":
    main()
