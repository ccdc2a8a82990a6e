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
from cloudbridge_core.transports.mux_session import MuxSession, StreamPipe
from cloudbridge_core.transports.serving import run_session_handler

HANDSHAKE_TIMEOUT = 10.0


class TlsListener:
    """A running TLS server; ``aclose`` stops accepting and closes every session."""

    def __init__(self, handler: Callable[[Session], Awaitable[None]], limits: MuxLimits) -> None:
        self._handler = handler
        self._limits = limits
        self._server: asyncio.Server | None = None
        self._sessions: dict[MuxSession, asyncio.Task[object] | None] = {}

    @property
    def port(self) -> int:
        assert self._server is not None  # set by TlsTransport.serve before it returns
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, endpoint: Endpoint) -> None:
        self._server = await asyncio.start_server(
            self._accepted,
            endpoint.host,
            endpoint.port,
            ssl=endpoint.tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = MuxSession(StreamPipe(reader, writer), is_dialer=False, limits=self._limits)
        self._sessions[session] = asyncio.current_task()
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
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in sessions.values() if t), return_exceptions=True)
        await self._server.wait_closed()
        self._server = None


class TlsTransport:
    """Implements :class:`~cloudbridge_core.providers.Transport`."""

    def __init__(self, limits: MuxLimits | None = None) -> None:
        self._limits = limits or MuxLimits()

    async def connect(self, endpoint: Endpoint) -> Session:
        where = f"{endpoint.host}:{endpoint.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
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
        return MuxSession(StreamPipe(reader, writer), is_dialer=True, limits=self._limits)

    async def serve(
        self, endpoint: Endpoint, handler: Callable[[Session], Awaitable[None]]
    ) -> TlsListener:
        listener = TlsListener(handler, self._limits)
        await listener.start(endpoint)
        return listener
