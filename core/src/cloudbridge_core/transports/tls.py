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
from cloudbridge_core.log import get_logger
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import Endpoint, Session
from cloudbridge_core.transports.mux_session import MuxSession, StreamPipe
from cloudbridge_core.transports.preauth import Admission, PreauthGate
from cloudbridge_core.transports.serving import run_session_handler

#: the TLS handshake's deadline when the endpoint has no pre-auth gate
HANDSHAKE_TIMEOUT = 10.0

log = get_logger("transport.tls")


class TlsListener:
    """A running TLS server; ``aclose`` stops accepting and closes every session.

    The TLS handshake runs after the TCP accept, inside the connection's pre-auth budget
    (``endpoint.preauth``): one deadline covers the handshake and the hello together.
    """

    def __init__(self, handler: Callable[[Session], Awaitable[None]], limits: MuxLimits) -> None:
        self._handler = handler
        self._limits = limits
        self._tls: ssl.SSLContext | None = None
        self._gate: PreauthGate | None = None
        self._server: asyncio.Server | None = None
        self._sessions: dict[MuxSession, asyncio.Task[object] | None] = {}

    @property
    def port(self) -> int:
        assert self._server is not None  # set by TlsTransport.serve before it returns
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, endpoint: Endpoint) -> None:
        self._tls, self._gate = endpoint.tls, endpoint.preauth
        self._server = await asyncio.start_server(self._accepted, endpoint.host, endpoint.port)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._tls is not None  # set by start() before the first accept
        admission: Admission | None = None
        if self._gate is not None:
            peer = writer.get_extra_info("peername")
            admission = self._gate.admit(str(peer[0])) if peer else None
            if admission is None:  # over a cap (counted by the gate) or already gone
                writer.transport.abort()
                return
        loop = asyncio.get_running_loop()
        deadline = admission.deadline if admission else loop.time() + HANDSHAKE_TIMEOUT
        try:
            async with asyncio.timeout_at(deadline):
                await writer.start_tls(self._tls)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            if admission is not None and isinstance(exc, TimeoutError):
                admission.expire()
            elif admission is not None:
                admission.release()
            writer.transport.abort()
            log.debug("tls_handshake_failed", reason=str(exc) or type(exc).__name__)
            return
        session = MuxSession(
            StreamPipe(reader, writer), is_dialer=False, limits=self._limits, admission=admission
        )
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
