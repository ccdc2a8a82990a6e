"""A small GET-only HTTP server in the event loop: ``/metrics``, ``/healthz``, ``/api/v1/status``.

It runs in the loop (not a thread) so that handlers read the client's and relay's state
where it lives. Requests are parsed by h11; each connection answers one request.

Only requests whose ``Host`` is a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``),
the address the server listens on, or a name in ``allowed_hosts`` are answered: a web page
that rebinds its own DNS name to 127.0.0.1 sends its own name as ``Host`` and gets 421
without data, so it cannot read a client's tenant, peers and tunnels (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Mapping

import h11

from cloudbridge_core.log import get_logger

log = get_logger("httpd")

#: a handler returns (status code, content type, body)
Handler = Callable[[], tuple[int, str, bytes]]
MAX_REQUEST_BYTES = 16384
REQUEST_TIMEOUT = 10.0
#: ``Host`` names always answered: this machine's own
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


class LocalHttpServer:
    """``allowed_hosts``: ``Host`` names answered besides the loopback ones (a DNS
    rebinding guard: a security limit)."""

    def __init__(self, routes: Mapping[str, Handler], allowed_hosts: Collection[str] = ()) -> None:
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None
        self._hosts = set(LOOPBACK_HOSTS) | {name.lower() for name in allowed_hosts}
        self._port: int | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; return the base URL (``http://127.0.0.1:9464``)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        self._port = self._server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        # a scraper pointed at the listen address names it; an address is no DNS name a
        # web page could rebind (0.0.0.0 too: the URL printed for a wildcard listener)
        self._hosts.add(shown.lower())
        return f"http://{shown}:{self._port}"

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
        if not self._host_allowed(request):
            return 421, "text/plain", b"misdirected request: Host is not this machine\n"
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

    def _host_allowed(self, request: h11.Request) -> bool:
        values = [value for name, value in request.headers if name == b"host"]
        if len(values) != 1:
            return False
        split = _split_host(values[0].decode("ascii", "replace").lower())
        if split is None:
            return False
        name, port = split
        return name in self._hosts and port in ("", str(self._port))


def _split_host(value: str) -> tuple[str, str] | None:
    """``Host`` as (name, port); port is "" when absent; None when malformed."""
    if value.startswith("["):
        name, bracket, rest = value.partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        return f"{name}]", rest[1:]
    name, _, port = value.partition(":")
    return (name, port) if ":" not in port else None


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
