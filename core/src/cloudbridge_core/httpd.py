"""A small GET-only HTTP server in the event loop: ``/metrics``, ``/healthz``, ``/api/v1/status``.

It runs in the loop (not a thread) so that handlers read the client's and relay's state
where it lives. Requests are parsed by h11; each connection answers one request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

import h11

from cloudbridge_core.log import get_logger

log = get_logger("httpd")

#: a handler returns (status code, content type, body)
Handler = Callable[[], tuple[int, str, bytes]]
MAX_REQUEST_BYTES = 16384
REQUEST_TIMEOUT = 10.0


class LocalHttpServer:
    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; return the base URL (``http://127.0.0.1:9464``)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # a slow, broken or vanished client gets no answer
            with contextlib.suppress(TimeoutError, ConnectionError, h11.RemoteProtocolError):
                await self._respond(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        request = await asyncio.wait_for(_next_request(connection, reader), REQUEST_TIMEOUT)
        if request is None:
            return
        status, content_type, body = self._answer(request)
        headers = [("content-type", content_type), ("content-length", str(len(body)))]
        for event in (
            h11.Response(status_code=status, headers=[*headers, ("connection", "close")]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            writer.write(connection.send(event) or b"")
        await writer.drain()

    def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET\n"
        handler = self._routes.get(path)
        if handler is None:
            return 404, "text/plain", f"not found; try {', '.join(self._routes)}\n".encode()
        try:
            return handler()
        except Exception:  # a broken handler answers 500 and keeps the server up
            log.exception("http_handler_failed", path=path)
            return 500, "text/plain", b"internal error\n"


async def _next_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            connection.receive_data(data)
            if not data:
                return None
        elif isinstance(event, h11.ConnectionClosed):
            return None
