"""A small HTTP server in the event loop: ``/metrics``, ``/healthz``, ``/api/v1/status``, and
the relay's web console.

It runs in the loop (not a thread) so that handlers read the client's and relay's state
where it lives. Requests are parsed by h11; each connection answers one request. Fixed
``routes`` answer GET; an ``app`` (the console) gets every other path, any method, with a
body of at most :data:`MAX_BODY_BYTES`.

Only requests whose ``Host`` is a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``),
the address the server listens on, or a name in ``allowed_hosts`` are answered: a web page
that rebinds its own DNS name to 127.0.0.1 sends its own name as ``Host`` and gets 421
without data, so it cannot read a client's tenant, peers and tunnels (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

import h11

from cloudbridge_core.log import get_logger

log = get_logger("httpd")

#: a handler returns (status code, content type, body)
Handler = Callable[[], tuple[int, str, bytes]]
MAX_REQUEST_BYTES = 16384
#: the largest request body an ``app`` is given (a form, a JSON request): a security limit
MAX_BODY_BYTES = 16384
REQUEST_TIMEOUT = 10.0
#: ``Host`` names always answered: this machine's own
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


@dataclass(frozen=True)
class Request:
    """One request as an ``app`` sees it: header names lower case, the body whole."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    #: whether it came over TLS (a session cookie is then ``Secure``)
    secure: bool = False

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body, each field once (the last wins);
        empty when it is not one or has over 32 fields (no form here has more)."""
        try:
            fields = urllib.parse.parse_qsl(self.body.decode("utf-8", "replace"), max_num_fields=32)
        except ValueError:
            return {}
        return dict(fields)


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


App = Callable[[Request], Awaitable[Response]]


class LocalHttpServer:
    """``allowed_hosts``: ``Host`` names answered besides the loopback ones (a DNS
    rebinding guard: a security limit). ``app`` answers what ``routes`` do not; ``tls``
    serves HTTPS."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        allowed_hosts: Collection[str] = (),
        *,
        app: App | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._app = app
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._hosts = set(LOOPBACK_HOSTS) | {name.lower() for name in allowed_hosts}
        self._port: int | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; return the base URL (``http://127.0.0.1:9464``)."""
        if self._tls is None:
            self._server = await asyncio.start_server(self._serve, host, port)
        else:
            self._server = await asyncio.start_server(
                self._serve, host, port, ssl=self._tls, ssl_handshake_timeout=REQUEST_TIMEOUT
            )
        self._port = self._server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        # a scraper pointed at the listen address names it; an address is no DNS name a
        # web page could rebind (0.0.0.0 too: the URL printed for a wildcard listener)
        self._hosts.add(shown.lower())
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{shown}:{self._port}"

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
        deadline = asyncio.get_running_loop().time() + REQUEST_TIMEOUT
        async with asyncio.timeout_at(deadline):
            request = await _next_request(connection, reader)
        if request is None:
            return
        async with asyncio.timeout_at(deadline):
            answer = await self._answer(request, connection, reader)
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
            *answer.headers,
            ("connection", "close"),
        ]
        for event in (
            h11.Response(status_code=answer.status, headers=headers),
            h11.Data(data=answer.body),
            h11.EndOfMessage(),
        ):
            writer.write(connection.send(event) or b"")
        await writer.drain()

    async def _answer(
        self, request: h11.Request, connection: h11.Connection, reader: asyncio.StreamReader
    ) -> Response:
        if not self._host_allowed(request):
            return _text(421, "misdirected request: Host is not this machine")
        target = request.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        handler = self._routes.get(path)
        if handler is None and self._app is not None:
            return await self._to_app(self._app, request, path, query, connection, reader)
        if request.method not in (b"GET", b"HEAD"):
            return _text(405, "only GET")
        if handler is None:
            return _text(404, f"not found; try {', '.join(self._routes)}")
        try:
            return Response(*handler())
        except Exception:  # a broken handler answers 500 and keeps the server up
            log.exception("http_handler_failed", path=path)
            return _text(500, "internal error")

    async def _to_app(
        self,
        app: App,
        request: h11.Request,
        path: str,
        query: str,
        connection: h11.Connection,
        reader: asyncio.StreamReader,
    ) -> Response:
        body = await _body(request, connection, reader)
        if body is None:
            return _text(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
        try:
            fields = dict(urllib.parse.parse_qsl(query, max_num_fields=16))
        except ValueError:
            return _text(400, "too many query fields")
        try:
            return await app(
                Request(
                    request.method.decode("ascii", "replace"),
                    path,
                    fields,
                    headers,
                    body,
                    secure=self._tls is not None,
                )
            )
        except Exception:  # a broken page answers 500 and keeps the server up
            log.exception("http_handler_failed", path=path)
            return _text(500, "internal error")

    def _host_allowed(self, request: h11.Request) -> bool:
        values = [value for name, value in request.headers if name == b"host"]
        if len(values) != 1:
            return False
        split = _split_host(values[0].decode("ascii", "replace").lower())
        if split is None:
            return False
        name, port = split
        return name in self._hosts and port in ("", str(self._port))


def _text(status: int, text: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", f"{text}\n".encode())


async def _body(
    request: h11.Request, connection: h11.Connection, reader: asyncio.StreamReader
) -> bytes | None:
    """The request's body, or None when it is over :data:`MAX_BODY_BYTES`."""
    declared = [value for name, value in request.headers if name == b"content-length"]
    if declared and int(declared[0]) > MAX_BODY_BYTES:
        return None  # said before reading: a large upload is never taken in
    body = bytearray()
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                return None
        elif event is h11.NEED_DATA:
            data = await reader.read(4096)
            connection.receive_data(data)
            if not data:
                return bytes(body)
        else:  # EndOfMessage, or the connection closed
            return bytes(body)


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
