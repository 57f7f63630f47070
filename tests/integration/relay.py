"""A TCP relay on loopback that a test can cut: every byte between one client and a server
goes through it, and `cut()` drops every connection and refuses new ones until `restore()`.
`freeze()` makes it a path that silently drops packets: connections stay open and new ones
are accepted, but no byte goes through in either direction until `restore()`.

With `kafka_requests=True` it reads what the client sends as Kafka requests, and
`hold_from(api_key)` makes it a path that holds bytes: from the first request with that API
key on, what the client sends is kept (even after the client hung up) until `release()`
delivers it to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    def __init__(self, *, target_port: int, listen_port: int = 0,
                 kafka_requests: bool = False) -> None:
        self.target_port = target_port
        self.kafka_requests = kafka_requests
        self.listen_port = listen_port
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._frozen = False
        self._hold_api_key: int | None = None
        self._released = asyncio.Event()
        self.held_requests = 0
        self._holding: dict[asyncio.StreamWriter, list[bytes]] = {}

    def hold_from(self, api_key: int) -> None:
        assert self.kafka_requests, "holding needs a relay that reads Kafka requests"
        self._hold_api_key = api_key
        self._released.clear()

    def release(self) -> None:
        """Deliver every held request, in order, and forward the rest again."""
        self._hold_api_key = None
        for writer, held in self._holding.items():
            if held and not writer.is_closing():
                writer.write(b"".join(held))
            held.clear()
        self._released.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self._cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def freeze(self) -> None:
        self._frozen = True

    def restore(self) -> None:
        self._cut = False
        self._frozen = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        while self._frozen:
            if not await _discard_a_while(reader):
                writer.transport.abort()
                return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            upstream = self._requests if self.kafka_requests else self._pipe
            await asyncio.gather(upstream(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while not self._cut:
                data = await reader.read(65536)
                if not data:
                    break
                if self._frozen:
                    continue  # dropped
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server, one Kafka request (4-byte size, then the request) at a time."""
        held: list[bytes] = []
        self._holding[writer] = held
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            while not self._cut:
                size = await reader.readexactly(4)
                request = await reader.readexactly(int.from_bytes(size, "big"))
                api_key = int.from_bytes(request[:2], "big")
                if self._frozen:
                    continue  # dropped
                if held or (self._hold_api_key is not None and api_key == self._hold_api_key):
                    self.held_requests += 1
                    held.append(size + request)
                    continue
                writer.write(size + request)
                await writer.drain()
        if held:
            await self._released.wait()
            await asyncio.sleep(1.0)  # the broker answers; nobody listens
        self._holding.pop(writer, None)
        writer.transport.abort()


async def _discard_a_while(reader: asyncio.StreamReader) -> bool:
    """Read and drop what a client sends for a moment; False once it hung up."""
    try:
        data = await asyncio.wait_for(reader.read(65536), 0.2)
    except TimeoutError:
        return True
    except (OSError, ConnectionError):
        return False
    return bool(data)
