"""The core multiplexer over a TLS WebSocket; `websockets` exceptions end at this boundary."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from cloudbridge_core.api import (
    Admission,
    ConnectionTimeout,
    Endpoint,
    MuxSession,
    PipeReceiver,
    PreauthGate,
    ProtocolViolation,
    ServerUnavailable,
    Session,
    TlsVerificationFailed,
    TransportError,
    build,
    run_session_handler,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, WebSocketException
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, State

SUBPROTOCOL = "cloudbridge.v1"
#: the largest WebSocket message before the relay authenticates the peer: room for the
#: hello (16 KiB) in the multiplexer's frames, far below max_message_bytes. A security limit.
PREAUTH_MESSAGE_BYTES = 64 * 1024


#: binary messages a connection keeps before its session takes them (the moment between
#: the handshake and the session's start); past it, the socket is not read meanwhile
EARLY_MESSAGES = 16


class DirectConnection(Connection):
    """A connection whose binary messages go to the multiplexer's session as their frames
    arrive, in the connection's callback (the session's direct mode: no task between the
    socket and the streams), instead of through ``recv``: from the handshake on, they are
    kept here until a receiver is attached, then delivered to it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receiver: PipeReceiver | None = None
        self._early: deque[bytes] = deque()
        self._arrived: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._violation: ProtocolViolation | None = None
        self.ended = False
        self.end_error: BaseException | None = None
        #: why reading is paused (empty: reading)
        self.holds: set[str] = set()

    def process_event(self, event: Event) -> None:
        if not isinstance(event, Frame) or event.opcode not in (
            Opcode.BINARY,
            Opcode.CONT,
            Opcode.TEXT,
        ):
            super().process_event(event)  # the handshake, pongs
            return
        if event.opcode is Opcode.TEXT or (self._violation is not None):
            self._violation = ProtocolViolation("text WebSocket message on a binary channel")
            self.transport.abort()
            return
        if not event.fin:  # a fragment: its message is bounded by max_size like any other
            self._fragments.append(bytes(event.data))
            return
        data = bytes(event.data)
        if self._fragments:
            data = b"".join([*self._fragments, data])
            self._fragments.clear()
        if self.receiver is not None:
            self.receiver.pipe_data(data)
            return
        self._early.append(data)
        if len(self._early) == EARLY_MESSAGES:
            self.hold("early")
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def next_message(self) -> bytes:
        """The next binary message kept (``b""`` at the end) while no receiver is attached."""
        while not self._early:
            if self.ended:
                if self.end_error is not None:
                    raise self.end_error
                return b""
            self._arrived = self.loop.create_future()
            try:
                await self._arrived
            finally:
                self._arrived = None
        self.release("early")
        return self._early.popleft()

    def attach(self, receiver: PipeReceiver) -> None:
        self.receiver = receiver
        if self._early:
            data = b"".join(self._early)
            self._early.clear()
            self.release("early")
            receiver.pipe_data(data)
        if self.ended:
            receiver.pipe_ended(self.end_error)

    def hold(self, reason: str) -> None:
        if not self.holds:
            self.transport.pause_reading()
        self.holds.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.holds:
            self.holds.discard(reason)
            if not self.holds and not self.transport.is_closing():
                self.transport.resume_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.receiver is not None:
            self.receiver.pipe_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.ended = True
        self.end_error = self._violation or exc
        if self.receiver is not None:
            self.receiver.pipe_ended(self.end_error)
        elif self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)


class DirectClientConnection(DirectConnection, ClientConnection):
    pass


class WebSocketPipe:
    """A :class:`~cloudbridge_core.transports.mux_session.Pipe` over binary WebSocket
    messages; a direct one (``attach``, ``write_now``) when its connection is a
    :class:`DirectConnection`, as this transport's always are."""

    def __init__(self, websocket: DirectConnection, max_message: int) -> None:
        self._websocket = websocket
        self._max_message = max_message
        peer = websocket.remote_address
        #: the peer's IP address, the TCP connection's (the relay limits request rates per
        #: address too; a proxy's forwarding headers are not trusted for that)
        self.peer_address: str | None = str(peer[0]) if isinstance(peer, tuple) else None

    async def receive(self) -> bytes:
        return await self._websocket.next_message()

    def attach(self, receiver: PipeReceiver) -> None:
        self._websocket.attach(receiver)

    def hold(self, reason: str) -> None:
        self._websocket.hold(reason)

    def release(self, reason: str) -> None:
        self._websocket.release(reason)

    @property
    def writing_paused(self) -> bool:
        return self._websocket.paused

    def write_now(self, data: bytes | bytearray) -> None:
        websocket = self._websocket
        if websocket.protocol.state is not State.OPEN:
            raise ConnectionResetError("the WebSocket is closed")
        view = memoryview(data)
        for start in range(0, len(view), self._max_message):
            websocket.protocol.send_binary(view[start : start + self._max_message])
        websocket.send_data()

    async def send(self, data: bytes | bytearray) -> None:
        self.write_now(data)
        await self._websocket.drain()

    async def aclose(self) -> None:
        await self._websocket.close()

    def abort(self) -> None:
        transport: asyncio.Transport = self._websocket.transport
        transport.abort()

    def authenticated(self) -> None:
        """Messages may be as large as configured once the peer is authenticated."""
        self._websocket.protocol.max_message_size = self._max_message


class PreauthConnection(DirectConnection, ServerConnection):
    """A server connection held to the relay's pre-auth budget from its TCP accept: its
    admission (per-address and total caps) is asked for when TLS is up, and until the
    session takes it over (:meth:`take_admission`) the connection is aborted at its
    deadline, whatever stage it stalls in (TLS is bounded by ``ssl_handshake_timeout``)."""

    gate: PreauthGate | None = None  # set on the subclass each listener makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # asyncio builds the protocol when it accepts the TCP connection, before TLS
        self._accepted_at = asyncio.get_running_loop().time()
        self._admission: Admission | None = None
        self._expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.gate is None:
            return
        peer = transport.get_extra_info("peername")
        self._admission = self.gate.admit(str(peer[0]), since=self._accepted_at) if peer else None
        if self._admission is None:  # over a cap (counted by the gate) or already gone
            cast(asyncio.Transport, transport).abort()
            return
        self.protocol.max_message_size = PREAUTH_MESSAGE_BYTES
        loop = asyncio.get_running_loop()
        stream = cast(asyncio.Transport, transport)  # TLS (uvloop's are no subclass)
        self._expiry = loop.call_at(self._admission.deadline, self._expired, stream)

    def _expired(self, transport: asyncio.Transport) -> None:
        self._expiry = None
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.expire()
        transport.abort()

    def take_admission(self) -> Admission | None:
        """Hand the admission (and its deadline) over to the session."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        admission, self._admission = self._admission, None
        return admission

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        admission = self.take_admission()
        if admission is not None:
            admission.release()


class WebSocketListener:
    def __init__(self) -> None:
        self.server: Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = next(iter(self.server.sockets)).getsockname()[1]
        return port

    async def aclose(self) -> None:
        # websockets waits for every handler to return; a handler waiting on its session
        # would hold the listener open forever, so closing ends them
        for task in self.handlers:
            task.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """``transport.websocket`` as the core hands it over: validated, every default from
    ``hooks.SETTINGS_SCHEMA`` (so none here), durations in seconds."""

    path: str
    ping_interval: float
    ping_timeout: float
    max_message_bytes: int


class WebSocketTransport:
    """Implements :class:`~cloudbridge_core.providers.Transport`."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(WebSocketSettings, settings)

    def _options(self) -> dict[str, Any]:
        return {
            "subprotocols": [SUBPROTOCOL],
            "ping_interval": self.settings.ping_interval,
            "ping_timeout": self.settings.ping_timeout,
            "max_size": self.settings.max_message_bytes,
            "compression": None,  # tunnelled bytes are often compressed already; spare the CPU
        }

    async def connect(self, endpoint: Endpoint) -> Session:
        name = endpoint.verified_name
        host = f"[{name}]" if ":" in name else name
        # the URI names the relay (its Host header and SNI); the socket goes to endpoint.host
        uri = f"wss://{host}:{endpoint.port}{self.settings.path}"
        where = f"{endpoint.host}:{endpoint.port}"
        address: dict[str, Any] = {} if endpoint.server_name is None else {"host": endpoint.host}
        try:
            websocket = await asyncio.wait_for(
                connect(
                    uri,
                    ssl=endpoint.tls,
                    open_timeout=None,
                    create_connection=DirectClientConnection,
                    **address,
                    **self._options(),
                ),
                endpoint.connect_timeout,
            )
        except TimeoutError as exc:
            raise ConnectionTimeout(f"no WebSocket connection to {where} in time") from exc
        except ssl.SSLCertVerificationError as exc:
            raise TlsVerificationFailed(
                f"the certificate of {where} is not trusted: {exc.verify_message}"
            ) from exc
        except (InvalidHandshake, WebSocketException, ssl.SSLError) as exc:
            raise TransportError(f"WebSocket handshake with {where} failed: {exc}") from exc
        except OSError as exc:
            raise ServerUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        if websocket.subprotocol != SUBPROTOCOL:
            await websocket.close()
            raise TransportError(f"{where} does not speak {SUBPROTOCOL}")
        assert isinstance(websocket, DirectConnection)  # create_connection above
        return MuxSession(WebSocketPipe(websocket, self.settings.max_message_bytes), is_dialer=True)

    async def serve(
        self, endpoint: Endpoint, handler: Callable[[Session], Awaitable[None]]
    ) -> WebSocketListener:
        listener = WebSocketListener()

        async def accepted(websocket: ServerConnection) -> None:
            assert isinstance(websocket, PreauthConnection)  # create_connection below
            admission = websocket.take_admission()
            if (
                websocket.subprotocol != SUBPROTOCOL
                or websocket.request is None
                or websocket.request.path != self.settings.path
            ):
                if admission is not None:
                    admission.release()
                await websocket.close(
                    1002, f"expected subprotocol {SUBPROTOCOL} at {self.settings.path}"
                )
                return
            session = MuxSession(
                WebSocketPipe(websocket, self.settings.max_message_bytes),
                is_dialer=False,
                admission=admission,
            )
            task = asyncio.current_task()
            assert task is not None
            listener.handlers.add(task)
            try:
                await run_session_handler(handler, session)
            finally:
                listener.handlers.discard(task)

        def documents(_connection: ServerConnection, request: Request) -> Response | None:
            found = endpoint.documents.get(request.path)
            if found is None or "upgrade" in request.headers.get("Connection", "").lower():
                return None  # a WebSocket handshake (or a 404 from websockets)
            content_type, body = found
            headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return Response(200, "OK", headers, body)

        # a PreauthConnection without a gate holds nobody to a budget
        connection = type("Connection", (PreauthConnection,), {"gate": endpoint.preauth})
        budget: dict[str, Any] = {"create_connection": connection}
        if endpoint.preauth is not None:
            budget |= {
                "ssl_handshake_timeout": endpoint.preauth.timeout,
                "open_timeout": endpoint.preauth.timeout,
            }
        listener.server = await serve(
            accepted,
            endpoint.host,
            endpoint.port,
            ssl=endpoint.tls,
            process_request=documents,
            **self._options(),
            **budget,
        )
        return listener
