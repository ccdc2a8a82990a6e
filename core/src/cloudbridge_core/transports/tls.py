"""TLS over TCP carrying the core multiplexer: the transport that needs no plugin."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

from cloudbridge_core.accept import accept_forever
from cloudbridge_core.errors import (
    ConnectionTimeout,
    ServerUnavailable,
    TlsVerificationFailed,
    TransportError,
)
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.protocol.preamble import ticket_of
from cloudbridge_core.providers import Endpoint, Session
from cloudbridge_core.pump import abort, prepare
from cloudbridge_core.transports.mux_session import (
    HIGH_WATER,
    PREAUTH_HIGH_WATER,
    MuxSession,
    ProtocolPipe,
)
from cloudbridge_core.transports.preauth import Admission, PreauthGate
from cloudbridge_core.transports.serving import run_session_handler
from cloudbridge_core.transports.sniff import RawSplices, can_sniff, sniff

#: the TLS handshake's deadline when the endpoint has no pre-auth gate
HANDSHAKE_TIMEOUT = 10.0
#: connections the kernel queues for the listener
LISTEN_BACKLOG = 1024


class TlsListener:
    """A running TLS server; ``aclose`` stops accepting and closes every session.

    The pre-auth budget (``endpoint.preauth``) applies from the TCP accept: the per-address
    and total caps are checked before the TLS handshake starts, and one deadline covers
    the handshake and the hello together.
    """

    def __init__(self, handler: Callable[[Session], Awaitable[None]], limits: MuxLimits) -> None:
        self._handler = handler
        self._limits = limits
        self._gate: PreauthGate | None = None
        self._tls: ssl.SSLContext | None = None
        #: takes peers' raw connections (sniffed in ``_serve``), where the loop can peek
        self._raw: RawSplices | None = None
        self._sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        #: every accepted connection's task, from the handshake to the session's end
        self._connections: set[asyncio.Task[None]] = set()
        self._sessions: set[MuxSession] = set()

    @property
    def port(self) -> int:
        assert self._sockets  # set by TlsTransport.serve before it returns
        port: int = self._sockets[0].getsockname()[1]
        return port

    async def start(self, endpoint: Endpoint) -> None:
        self._gate = endpoint.preauth
        self._tls = endpoint.tls
        loop = asyncio.get_running_loop()
        if endpoint.raw_splices is not None and can_sniff(loop):
            self._raw = endpoint.raw_splices
        # the listener accepts by itself (rather than loop.create_server): it admits a
        # connection before any TLS, and hands it to TLS before any byte of it is read
        self._sockets = await _listening_sockets(endpoint.host, endpoint.port)
        self._acceptors = [
            loop.create_task(accept_forever(sock, self._accepted)) for sock in self._sockets
        ]
        if self._raw is not None:
            self._raw.listening(self.port)

    def _accepted(self, connection: socket.socket, address: object) -> None:
        """A TCP connection, before TLS: admitted within the caps, or dropped at once."""
        admission: Admission | None = None
        if self._gate is not None:
            host = address[0] if isinstance(address, tuple) else None
            admission = self._gate.admit(str(host)) if host is not None else None
            if admission is None:  # over a cap (counted by the gate) or already gone
                abort(connection)
                return
        task = asyncio.get_running_loop().create_task(self._serve(connection, admission))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, connection: socket.socket, admission: Admission | None) -> None:
        assert self._tls is not None  # a relay listener always has its certificate
        high_water = HIGH_WATER if admission is None else PREAUTH_HIGH_WATER
        timeout = HANDSHAKE_TIMEOUT if admission is None else max(admission.remaining(), 0.001)
        pipe = ProtocolPipe(high_water)
        try:
            if self._raw is not None:  # a peer's raw connection, or TLS (left unread)
                prepare(connection)
                loop = asyncio.get_running_loop()
                started = loop.time()
                raw = await sniff(connection, timeout)
                if raw is not None:
                    await self._splice_raw(connection, admission, raw)
                    return
                timeout = max(timeout - (loop.time() - started), 0.001)
            # the pipe is taken from here, not from the result: uvloop returns its own
            # SSL protocol there
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: pipe,
                prepare(connection),
                ssl=self._tls,
                ssl_handshake_timeout=timeout,
            )
        except BaseException as exc:  # a failed handshake, or the listener closing
            abort(connection)
            if admission is not None and isinstance(exc, TimeoutError):
                admission.expire()
            elif admission is not None:
                admission.release()
            if isinstance(exc, OSError):  # TimeoutError and ssl.SSLError are OSErrors
                return
            raise
        session = MuxSession(pipe, is_dialer=False, limits=self._limits, admission=admission)
        self._sessions.add(session)
        try:
            await run_session_handler(self._handler, session)
        finally:
            self._sessions.discard(session)

    async def _splice_raw(
        self, connection: socket.socket, admission: Admission | None, raw: bytes
    ) -> None:
        """A preamble read: the ticket's connection goes to the relay's desk, which checks
        it before anything else; anything else is dropped and counted (never logged: a
        ticket is a secret while it lasts)."""
        assert self._raw is not None
        if admission is not None:  # from here the desk's own deadlines and caps hold
            admission.release()
        ticket = ticket_of(raw)
        if ticket is None:
            self._raw.refused("bad_preamble")
            abort(connection)
            return
        await self._raw.redeem(ticket, connection)

    async def aclose(self) -> None:
        if not self._sockets:
            return
        for acceptor in self._acceptors:
            acceptor.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self._sockets:
            sock.close()
        self._sockets, self._acceptors = [], []
        for session in list(self._sessions):
            await session.aclose()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)


async def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of ``host`` (as
    ``loop.create_server`` makes them: SO_REUSEADDR, IPv6 sockets IPv6-only); raises
    ``OSError`` when one cannot be bound."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, resolved in dict.fromkeys(infos):
            # port 0 asked: every address gets the port the first one got
            address = (resolved[0], port, *resolved[2:]) if port else resolved
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: {exc.strerror}",
                ) from None
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            port = port or sock.getsockname()[1]  # one port for every address, as asked
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class TlsTransport:
    """Implements :class:`~cloudbridge_core.providers.Transport`."""

    def __init__(self, limits: MuxLimits | None = None) -> None:
        self._limits = limits or MuxLimits()

    async def connect(self, endpoint: Endpoint) -> Session:
        where = f"{endpoint.host}:{endpoint.port}"
        loop = asyncio.get_running_loop()
        pipe = ProtocolPipe()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: pipe,
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=endpoint.verified_name,
                    ssl_handshake_timeout=endpoint.connect_timeout,
                ),
                endpoint.connect_timeout,
            )
        except TimeoutError as exc:
            raise ConnectionTimeout(
                f"no TLS connection to {where} within {endpoint.connect_timeout}s"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise TlsVerificationFailed(
                f"the certificate of {where} is not trusted: {exc.verify_message}",
                hint="check relay.tls.ca_file (the relay prints its CA fingerprint on start)",
            ) from exc
        except ssl.SSLError as exc:
            raise TransportError(f"TLS with {where} failed: {exc.reason}") from exc
        except OSError as exc:
            raise ServerUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        return MuxSession(pipe, is_dialer=True, limits=self._limits)

    async def serve(
        self, endpoint: Endpoint, handler: Callable[[Session], Awaitable[None]]
    ) -> TlsListener:
        listener = TlsListener(handler, self._limits)
        await listener.start(endpoint)
        return listener
