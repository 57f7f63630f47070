"""The sample order source in a process of its own, with a control port for the benchmark.

`python -m bench.source_server --port P --control-port C --rate R` serves
`reconciler.sample_source.SampleSource` on P and, on C, `GET /stats` (requests answered,
by status, and in flight) and `GET /overlaps` (the source's overlap detector: pairs of runs
of one config whose requests interleave in time). Both on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal

from aiohttp import web

from reconciler.sample_source import SampleSource


async def serve(port: int, control_port: int, rate: float) -> None:
    source = SampleSource(host="127.0.0.1", port=port, rate=rate)
    await source.start()

    async def stats(_: web.Request) -> web.Response:
        records = source.requests()
        statuses = collections.Counter(str(r.status) for r in records)
        return web.json_response({
            "requests": len(records),
            "statuses": dict(statuses),
            "orders": sum(r.orders for r in records),
            "in_flight": source.in_flight(),
            "configs": len({r.config_id for r in records}),
            "runs": len({r.run_id for r in records}),
        })

    async def overlaps(_: web.Request) -> web.Response:
        found = source.overlaps()
        return web.json_response({
            "pairs": len(found),
            "configs": len({config_id for config_id, _, _ in found}),
            "examples": [list(pair) for pair in found[:5]],
        })

    control = web.Application()
    control.router.add_get("/stats", stats)
    control.router.add_get("/overlaps", overlaps)
    runner = web.AppRunner(control, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    await source.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1.0,
                        help="orders per second that appear for each (channel, product)")
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.control_port, arguments.rate))


if __name__ == "__main__":
    main()
