"""TLS over TCP carrying the core multiplexer: the transport that needs no plugin."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from cloudbridge_core.errors import (
    ConnectionTimeout,
    ServerUnavailable,
    TlsVerificationFailed,
    TransportError,
)
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import Endpoint, Session
from cloudbridge_core.transports.mux_session import (
    HIGH_WATER,
    PREAUTH_HIGH_WATER,
    MuxSession,
    ProtocolPipe,
)
from cloudbridge_core.transports.preauth import Admission, PreauthGate
from cloudbridge_core.transports.serving import run_session_handler

#: the TLS handshake's deadline when the endpoint has no pre-auth gate
HANDSHAKE_TIMEOUT = 10.0


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
        self._server: asyncio.Server | None = None
        #: every accepted connection's task, from the handshake to the session's end
        self._connections: set[asyncio.Task[None]] = set()
        self._sessions: set[MuxSession] = set()

    @property
    def port(self) -> int:
        assert self._server is not None  # set by TlsTransport.serve before it returns
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, endpoint: Endpoint) -> None:
        self._gate = endpoint.preauth
        self._tls = endpoint.tls
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _TcpAccepted(self._accepted), endpoint.host, endpoint.port
        )

    def _accepted(self, transport: asyncio.Transport) -> None:
        """A TCP connection, before TLS: admitted within the caps, or dropped at once."""
        admission: Admission | None = None
        if self._gate is not None:
            peer = transport.get_extra_info("peername")
            admission = self._gate.admit(str(peer[0])) if isinstance(peer, tuple) else None
            if admission is None:  # over a cap (counted by the gate) or already gone
                transport.abort()
                return
        task = asyncio.get_running_loop().create_task(self._serve(transport, admission))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, transport: asyncio.Transport, admission: Admission | None) -> None:
        assert self._tls is not None  # a relay listener always has its certificate
        pipe = ProtocolPipe(HIGH_WATER if admission is None else PREAUTH_HIGH_WATER)
        timeout = HANDSHAKE_TIMEOUT if admission is None else max(admission.remaining(), 0.001)
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport, pipe, self._tls, server_side=True, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            if admission is not None:
                admission.expire() if isinstance(exc, TimeoutError) else admission.release()
            transport.abort()
            return
        if secure is None:  # the connection was lost during the handshake
            if admission is not None:
                admission.release()
            return
        pipe.connection_made(secure)  # start_tls does not tell the protocol itself
        session = MuxSession(pipe, is_dialer=False, limits=self._limits, admission=admission)
        self._sessions.add(session)
        try:
            await run_session_handler(self._handler, session)
        finally:
            self._sessions.discard(session)

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for session in list(self._sessions):
            await session.aclose()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None


class _TcpAccepted(asyncio.Protocol):
    """A TCP connection just accepted: it waits, unread, for the listener's TLS handshake."""

    def __init__(self, on_accepted: Callable[[asyncio.Transport], None]) -> None:
        self._on_accepted = on_accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        tcp.pause_reading()  # the handshake reads from here on: no byte may land in this protocol
        self._on_accepted(tcp)


class TlsTransport:
    """Implements :class:`~cloudbridge_core.providers.Transport`."""

    def __init__(self, limits: MuxLimits | None = None) -> None:
        self._limits = limits or MuxLimits()

    async def connect(self, endpoint: Endpoint) -> Session:
        where = f"{endpoint.host}:{endpoint.port}"
        loop = asyncio.get_running_loop()
        try:
            _, pipe = await asyncio.wait_for(
                loop.create_connection(
                    ProtocolPipe,
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=endpoint.host,
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
