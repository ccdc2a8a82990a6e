"""A TCP proxy that can make the connections it holds go silent: a peer or relay that stops
answering without closing anything (a black-holed path), for tests and the recovery bench."""

from __future__ import annotations

import asyncio
import contextlib


class Blackhole:
    """Carries connections to ``upstream`` on loopback until :meth:`swallow_open_connections`:
    from then on what those connections send is swallowed and nothing is closed, while new
    connections pass."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self._generation = 0
        self._never = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on loopback; the port to reach ``upstream`` through."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def swallow_open_connections(self) -> None:
        self._generation += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._copy(source, sink, self._generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _copy(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, generation: int
    ) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if generation != self._generation:
                        await self._never.wait()
                    sink.write(data)
                    await sink.drain()
        finally:
            sink.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
