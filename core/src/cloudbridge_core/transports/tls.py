"""TLS over TCP carrying the core multiplexer: the transport that needs no plugin."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

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

    One pre-auth deadline (``endpoint.preauth``) covers the TLS handshake and the hello
    together: it counts from the TCP accept. The per-address and total caps apply once
    the handshake is done (until then asyncio holds the connection, for the same time
    at most).
    """

    def __init__(self, handler: Callable[[Session], Awaitable[None]], limits: MuxLimits) -> None:
        self._handler = handler
        self._limits = limits
        self._gate: PreauthGate | None = None
        self._server: asyncio.Server | None = None
        self._sessions: dict[MuxSession, asyncio.Task[None]] = {}

    @property
    def port(self) -> int:
        assert self._server is not None  # set by TlsTransport.serve before it returns
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, endpoint: Endpoint) -> None:
        self._gate = endpoint.preauth
        loop = asyncio.get_running_loop()

        def accept() -> ProtocolPipe:
            # asyncio builds the protocol when it accepts the TCP connection, before TLS;
            # the protocol hears connection_made once the handshake is done
            accepted_at = loop.time()
            high_water = HIGH_WATER if self._gate is None else PREAUTH_HIGH_WATER
            return _AcceptedPipe(high_water, lambda pipe: self._accepted(pipe, accepted_at))

        timeout = HANDSHAKE_TIMEOUT if self._gate is None else self._gate.timeout
        self._server = await loop.create_server(
            accept, endpoint.host, endpoint.port, ssl=endpoint.tls, ssl_handshake_timeout=timeout
        )

    def _accepted(self, pipe: ProtocolPipe, accepted_at: float) -> None:
        admission: Admission | None = None
        if self._gate is not None:
            address = pipe.peer_address
            admission = self._gate.admit(address, since=accepted_at) if address else None
            if admission is None:  # over a cap (counted by the gate) or already gone
                pipe.abort()
                return
        session = MuxSession(pipe, is_dialer=False, limits=self._limits, admission=admission)
        task = asyncio.get_running_loop().create_task(self._serve(session))
        self._sessions[session] = task

    async def _serve(self, session: MuxSession) -> None:
        try:
            await run_session_handler(self._handler, session)
        finally:
            self._sessions.pop(session, None)

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        sessions, self._sessions = self._sessions, {}
        for session, task in sessions.items():
            await session.aclose()
            task.cancel()
        await asyncio.gather(*sessions.values(), return_exceptions=True)
        await self._server.wait_closed()
        self._server = None


class _AcceptedPipe(ProtocolPipe):
    """A server connection's pipe: the listener takes it once TLS is established."""

    def __init__(self, high_water: int, on_connected: Callable[[ProtocolPipe], None]) -> None:
        super().__init__(high_water)
        self._on_connected = on_connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_connected(self)


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
