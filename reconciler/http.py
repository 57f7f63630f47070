"""The instance's HTTP endpoints on `RECONCILER_HTTP_PORT`, for orchestrators and scrapers.

- `/healthz`: 200 while the event loop runs (if it answers at all, the loop runs).
- `/readyz`: 200 once the instance has joined its consumer group and reached the database
  (a `SELECT 1` within a second), 503 with the reason otherwise.
- `/metrics`: Prometheus text format, from the instance's own metrics registry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class EndpointsUnavailable(Exception):
    """The HTTP endpoints cannot listen where the settings say."""


class HttpEndpoints:
    def __init__(
        self,
        *,
        port: int,
        joined: Callable[[], bool],
        database_answers: Callable[[], Awaitable[bool]],
        metrics_text: Callable[[], bytes],
        host: str,
    ) -> None:
        self._port = port
        self._host = host
        self._joined = joined
        self._database_answers = database_answers
        self._metrics_text = metrics_text
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except OSError as error:
            await self._runner.cleanup()
            raise EndpointsUnavailable(
                f"cannot serve the HTTP endpoints on {self._host}:{self._port}: "
                f"{error.strerror or error}; each instance on a host needs its own "
                f"RECONCILER_HTTP_PORT (0 serves no endpoints)"
            ) from None
        log.info("serving /healthz, /readyz and /metrics on %s:%d", self._host, self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        if not self._joined():
            return web.Response(
                status=503,
                text="not ready: not a member of the group, the broker is away, or the configs "
                     "stream stopped reading\n",
            )
        try:
            reachable = await asyncio.wait_for(self._database_answers(), 1.0)
        except (Exception, TimeoutError):
            reachable = False
        if not reachable:
            return web.Response(status=503, text="not ready: the database does not answer\n")
        return web.Response(text="ready\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._metrics_text)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
