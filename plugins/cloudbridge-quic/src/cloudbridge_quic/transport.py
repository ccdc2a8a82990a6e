"""QUIC transport: TLS 1.3, ALPN cloudbridge/1, one native QUIC stream per CloudBridge stream."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket, load_pem_private_key, load_pem_x509_certificates
from cloudbridge_core.api import (
    ALPN,
    ConnectionTimeout,
    Endpoint,
    QuicSession,
    ServerUnavailable,
    Session,
    StatelessResets,
    TlsMaterial,
    TlsVerificationFailed,
    TransportError,
    bound_quic_connection,
    build,
    forbid_fragmentation,
    run_session_handler,
)

from cloudbridge_quic.server import RelayQuicServer

#: session tickets a relay remembers for resumption (memory bound)
MAX_TICKETS = 10_000
#: TLS alerts the client raises for a certificate it does not trust
_CERTIFICATE_ALERTS = (0x100 + 42, 0x100 + 48)  # bad_certificate, unknown_ca
#: bytes of the key reset tokens derive from when the relay gives none
_RESET_KEY_SIZE = 32


class TicketStore:
    """Session tickets by label, oldest forgotten first."""

    def __init__(self) -> None:
        self._tickets: OrderedDict[bytes, SessionTicket] = OrderedDict()

    def add(self, ticket: SessionTicket) -> None:
        self._tickets[ticket.ticket] = ticket
        while len(self._tickets) > MAX_TICKETS:
            self._tickets.popitem(last=False)

    def pop(self, label: bytes) -> SessionTicket | None:
        return self._tickets.pop(label, None)


class QuicListener:
    """A running QUIC server; ``aclose`` closes every session and ends their handlers."""

    def __init__(self, handler: Callable[[Session], Awaitable[None]]) -> None:
        self._handler = handler
        self.server: RelayQuicServer | None = None
        self.tickets = TicketStore()
        self._handlers: dict[QuicSession, asyncio.Task[None]] = {}

    @property
    def port(self) -> int:
        assert self.server is not None
        assert self.server._transport is not None
        port: int = self.server._transport.get_extra_info("sockname")[1]
        return port

    def session_ready(self, session: QuicSession) -> None:
        self._handlers[session] = asyncio.get_running_loop().create_task(self._run(session))

    async def _run(self, session: QuicSession) -> None:
        try:
            await run_session_handler(self._handler, session)
        finally:
            self._handlers.pop(session, None)

    async def aclose(self) -> None:
        handlers, self._handlers = self._handlers, {}
        # without waiting out each closing period: the relay is stopping, and its clients
        # come back sooner the sooner it has (1,000 sessions took 4 s)
        for session in handlers:
            session.close_now("the relay is stopping")
        for task in handlers.values():
            task.cancel()
        await asyncio.gather(*handlers.values(), return_exceptions=True)
        if self.server is not None:
            self.server.close()
            self.server = None


@dataclass(frozen=True, slots=True)
class QuicSettings:
    """``transport.quic`` as the core hands it over: validated, every default from
    ``hooks.SETTINGS_SCHEMA`` (so none here), durations in seconds."""

    idle_timeout: float
    keepalive_interval: float
    max_datagram_size: int
    stream_window: int
    connection_window: int
    max_streams: int
    max_datagram_frame_bytes: int
    retry: bool


class QuicTransport:
    """Implements :class:`~cloudbridge_core.providers.Transport` with aioquic."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(QuicSettings, settings)
        self._tickets: dict[tuple[str, str, int], SessionTicket] = {}
        # aioquic logs every handshake step at info under "quic"; ours say what matters
        logging.getLogger("quic").setLevel(logging.WARNING)

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self.settings.idle_timeout,
            max_data=self.settings.connection_window,
            max_stream_data=self.settings.stream_window,
            max_datagram_frame_size=self.settings.max_datagram_frame_bytes,
            congestion_control_algorithm="cubic",
        )

    def _bound(self, connection: QuicConnection) -> QuicConnection:
        return bound_quic_connection(
            connection,
            stream_window=self.settings.stream_window,
            connection_window=self.settings.connection_window,
            max_streams=self.settings.max_streams,
        )

    async def connect(self, endpoint: Endpoint) -> QuicSession:
        material = _material(endpoint)
        where = f"{endpoint.host}:{endpoint.port}"
        configuration = self._configuration(is_client=True)
        configuration.server_name = endpoint.verified_name
        if material.ca is not None:
            configuration.cadata = material.ca
        if not material.verify:
            configuration.verify_mode = ssl.CERT_NONE
        # a ticket is the named server's: relays sharing a name may not share ticket keys
        key = (endpoint.verified_name, endpoint.host, endpoint.port)
        configuration.session_ticket = self._tickets.get(key)
        connection = self._bound(
            QuicConnection(
                configuration=configuration,
                session_ticket_handler=functools.partial(self._tickets.__setitem__, key),
            )
        )
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ServerUnavailable(f"cannot resolve {endpoint.host}: {exc}") from exc
        # UDP says nothing when a port is closed, so unlike TCP there is no cheap way to try
        # each address: IPv4 first, as relays commonly listen on 0.0.0.0 ("localhost" -> ::1)
        found.sort(key=lambda info: info[0] != socket.AF_INET)
        family, _, _, _, address = found[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # noqa: S104 - any local address
            # connected, the socket hears the ICMP port unreachable of a relay that is down
            sock.connect(address)
            forbid_fragmentation(sock)
            transport, session = await loop.create_datagram_endpoint(
                lambda: QuicSession(
                    connection,
                    datagram_ceiling=self.settings.max_datagram_size,
                    keepalive=self.settings.keepalive_interval,
                ),
                sock=sock,
            )
        except OSError as exc:  # no route to the relay, among others
            sock.close()
            raise ServerUnavailable(f"cannot reach {where}: {exc.strerror or exc}") from exc
        except BaseException:  # cancelled by a race another transport won, among others
            sock.close()
            raise
        session.connect(address)
        try:
            await asyncio.wait_for(session.wait_connected(), endpoint.connect_timeout)
        except asyncio.CancelledError:
            transport.close()
            raise
        except TimeoutError as exc:
            transport.close()
            raise ConnectionTimeout(f"no QUIC handshake with {where} in time") from exc
        except ConnectionError as exc:
            transport.close()
            if session.refused:
                raise ServerUnavailable(
                    f"{where} refused the QUIC connection: nothing listens on its UDP port"
                ) from exc
            closing = connection._close_event
            if closing is not None and closing.error_code in _CERTIFICATE_ALERTS:
                raise TlsVerificationFailed(
                    f"the certificate of {where} is not trusted: {closing.reason_phrase}"
                ) from exc
            reason = closing.reason_phrase if closing is not None else str(exc)
            raise TransportError(f"QUIC handshake with {where} failed: {reason}") from exc
        return session

    async def serve(
        self, endpoint: Endpoint, handler: Callable[[Session], Awaitable[None]]
    ) -> QuicListener:
        material = _material(endpoint)
        if material.certificate is None or material.key is None:
            raise TransportError("the QUIC transport needs a certificate and key to serve")
        configuration = self._configuration(is_client=False)
        certificate, *chain = load_pem_x509_certificates(material.certificate)
        configuration.certificate = certificate
        configuration.certificate_chain = chain
        configuration.private_key = load_pem_private_key(material.key)
        listener = QuicListener(handler)
        # without the relay's key, resets still end connections this process forgot
        resets = StatelessResets(endpoint.reset_key or secrets.token_bytes(_RESET_KEY_SIZE))

        def create_session(connection: QuicConnection, **_: Any) -> QuicSession:
            bounded = self._bound(connection)
            resets.adopt(bounded)
            return QuicSession(
                bounded,
                datagram_ceiling=self.settings.max_datagram_size,
                on_ready=listener.session_ready,
                preauth=endpoint.preauth,
            )

        def create_server() -> RelayQuicServer:
            return RelayQuicServer(
                resets,
                configuration=configuration,
                create_protocol=create_session,
                session_ticket_fetcher=listener.tickets.pop,
                session_ticket_handler=listener.tickets.add,
                # address validation: a spoofed Initial gets a stateless Retry, never a connection
                retry=self.settings.retry,
            )

        _, listener.server = await asyncio.get_running_loop().create_datagram_endpoint(
            create_server, local_addr=(endpoint.host, endpoint.port)
        )
        assert listener.server._transport is not None  # bound by create_datagram_endpoint
        forbid_fragmentation(listener.server._transport.get_extra_info("socket"))
        return listener


def _material(endpoint: Endpoint) -> TlsMaterial:
    if endpoint.material is None:
        raise TransportError("the QUIC transport needs the endpoint's TLS material (PEM)")
    return endpoint.material
