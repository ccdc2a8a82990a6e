"""gRPC transport (grpcio's asyncio API): TLS, HTTP/2, one bidirectional call per stream."""

from __future__ import annotations

import asyncio
import errno
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cloudbridge_core.api import (
    Admission,
    ConnectionTimeout,
    Endpoint,
    PreauthGate,
    ServerUnavailable,
    Session,
    StreamAborted,
    TlsMaterial,
    TlsVerificationFailed,
    TransportClosed,
    TransportError,
    build,
    client_context,
    run_session_handler,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from cloudbridge_grpc._generated.tunnel_pb2 import Chunk, Control
from cloudbridge_grpc.sessions import (
    REVERSE_HEADER,
    SESSION_HEADER,
    ClientSession,
    ServerSession,
)
from cloudbridge_grpc.streams import ServerStream

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "cloudbridge.v1.Tunnel"
#: room for the message and field headers around a chunk's data
_FRAMING = 64
#: the shortest keepalive_interval a client may set; the relay accepts a client's HTTP/2
#: PINGs down to half of it, whatever its own interval, so that no client is ever told
#: too_many_pings by its relay, and refuses faster ones (see ``_server_options``)
MIN_KEEPALIVE_INTERVAL = 1.0
#: PINGs in a row sooner than that before grpc ends the connection with GOAWAY
#: ENHANCE_YOUR_CALM (grpc's default, said here because it is a security limit)
MAX_PING_STRIKES = 2
#: how the pre-auth budget (server.preauth_timeout) is shared on gRPC, whose connections
#: grpc owns until a call arrives (nothing tells us when one was accepted): the handshake
#: (TLS, the HTTP/2 preface and SETTINGS), the wait for a first call, the Session call up
#: to its hello, and the wait after it until grpc closes the idle connection (each wait
#: is IDLE_SHARE): a stranger's connection ends within the budget from its accept
HANDSHAKE_SHARE = 0.4
IDLE_SHARE = 0.1


class GrpcListener:
    """A running gRPC server; ``aclose`` ends every session and its handler."""

    def __init__(
        self,
        handler: Callable[[Session], Awaitable[None]],
        piece: int,
        preauth: PreauthGate | None = None,
    ) -> None:
        self._handler = handler
        self._piece = piece
        self._preauth = preauth
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._sessions: dict[str, ServerSession] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    # ---- the Tunnel service ------------------------------------------------------------

    async def session_call(self, _requests: Any, context: Context) -> None:
        session_id = _header(context, SESSION_HEADER)
        if not session_id or session_id in self._sessions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing or reused session id")
            return
        peer = _peer_address(context.peer())
        admission: Admission | None = None
        if self._preauth is not None:
            # the connection may have been accepted up to the handshake's and the first
            # wait's shares of the budget ago, and lingers for the second wait after the
            # call: the call's deadline leaves room for all three
            lead = self._preauth.timeout * (HANDSHAKE_SHARE + 2 * IDLE_SHARE)
            since = asyncio.get_running_loop().time() - lead
            admission = self._preauth.admit(peer, since=since)
            if admission is None:  # over a cap (counted by the gate)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many unauthenticated connections"
                )
                return
        session = ServerSession(context, self._piece, admission, peer)
        self._sessions[session_id] = session
        handler = asyncio.create_task(run_session_handler(self._handler, session))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        client_left = asyncio.create_task(_until_the_client_ends(context, session))
        ended = asyncio.create_task(session.ended.wait())
        try:
            await context.write(Control())  # the acknowledgement
            await asyncio.wait({client_left, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_left.cancel()
            ended.cancel()
            self._sessions.pop(session_id, None)
            session.end(TransportClosed("the client closed the session"))
            handler.cancel()

    async def stream_call(self, _requests: Any, context: Context) -> None:
        session = self._sessions.get(_header(context, SESSION_HEADER) or "")
        if session is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown session")
            return
        stream = ServerStream(context, self._piece)
        session.stream_arrived(stream, _header(context, REVERSE_HEADER))
        try:
            await stream.done.wait()
        except asyncio.CancelledError:
            stream.fail(StreamAborted("the peer reset the stream"))  # the client cancelled
            raise
        finally:
            stream.call_ended()
        if stream.abort_status is not None:
            await context.abort(*stream.abort_status)

    async def aclose(self) -> None:
        for session in list(self._sessions.values()):
            session.end(TransportClosed("the relay is closing"))
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace=1.0)
            self.server = None


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """``transport.grpc`` as the core hands it over: validated, every default from
    ``hooks.SETTINGS_SCHEMA`` (so none here), durations in seconds."""

    max_message_bytes: int
    keepalive_interval: float
    keepalive_timeout: float


class GrpcTransport:
    """Implements :class:`~cloudbridge_core.providers.Transport` with grpcio."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(GrpcSettings, settings)
        self._piece = min(self.settings.max_message_bytes - _FRAMING, 1 << 20)

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.settings.keepalive_interval * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.settings.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def _server_options(self, preauth_timeout: float | None) -> list[tuple[str, Any]]:
        # grpc answers a client's PINGs itself, so it limits them: one sooner than the
        # interval after the last (while the relay sends no data or headers, which reset
        # the count) is a strike, and MAX_PING_STRIKES + 1 of them end the connection with
        # GOAWAY ENHANCE_YOUR_CALM ("too_many_pings"). The interval is half the shortest
        # keepalive a client may use, not the relay's own, so any client's keepalives pass.
        options = [
            *self._options(),
            # grpc binds with SO_REUSEPORT by default: a second relay on the same port would
            # share it silently, taking half the connections
            ("grpc.so_reuseport", 0),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(MIN_KEEPALIVE_INTERVAL * 500),
            ),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ]
        if preauth_timeout is not None:
            options += [
                # TLS, the HTTP/2 preface and the client's SETTINGS (grpc's default: 120 s)
                ("grpc.server_handshake_timeout_ms", int(preauth_timeout * HANDSHAKE_SHARE * 1000)),
                # a connection without a call is closed: a stranger's, before its first
                # call (clients call at once) and after its last (a session's call lasts
                # as long as the session)
                ("grpc.max_connection_idle_ms", int(preauth_timeout * IDLE_SHARE * 1000)),
            ]
        return options

    async def connect(self, endpoint: Endpoint) -> ClientSession:
        material = _material(endpoint)
        if not material.verify:
            raise TransportError(
                "the gRPC transport always verifies the relay's certificate",
                hint="set relay.tls.ca_file to the relay's CA, or choose another transport",
            )
        where = f"{endpoint.host}:{endpoint.port}"
        try:
            async with asyncio.timeout(endpoint.connect_timeout):
                await _check_tls(endpoint, material, where)
                return await self._open_session(endpoint, material, where)
        except TimeoutError:
            raise ConnectionTimeout(
                f"no gRPC session with {where} within {endpoint.connect_timeout:g}s"
            ) from None

    async def _open_session(
        self, endpoint: Endpoint, material: TlsMaterial, where: str
    ) -> ClientSession:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        options = self._options()
        if endpoint.server_name is not None:  # an address of the name: check the name
            options += [
                ("grpc.ssl_target_name_override", endpoint.server_name),
                ("grpc.default_authority", endpoint.server_name),
            ]
        channel = grpc.aio.secure_channel(
            f"{host}:{endpoint.port}",
            grpc.ssl_channel_credentials(root_certificates=material.ca),
            options=options,
        )
        session = ClientSession(channel, secrets.token_hex(16), self._piece)
        try:
            await session.start()
        except grpc.aio.AioRpcError as exc:
            await session.aclose()
            raise ServerUnavailable(f"gRPC session with {where} failed: {exc.details()}") from exc
        except BaseException:
            await session.aclose()
            raise
        return session

    async def serve(
        self, endpoint: Endpoint, handler: Callable[[Session], Awaitable[None]]
    ) -> GrpcListener:
        material = _material(endpoint)
        if material.certificate is None or material.key is None:
            raise TransportError("the gRPC transport needs a certificate and key to serve")
        listener = GrpcListener(handler, self._piece, endpoint.preauth)
        preauth_timeout = None if endpoint.preauth is None else endpoint.preauth.timeout
        server = grpc.aio.server(options=self._server_options(preauth_timeout))
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Session": grpc.stream_stream_rpc_method_handler(
                            listener.session_call,
                            request_deserializer=Control.FromString,
                            response_serializer=Control.SerializeToString,
                        ),
                        "Stream": grpc.stream_stream_rpc_method_handler(
                            listener.stream_call,
                            request_deserializer=Chunk.FromString,
                            response_serializer=Chunk.SerializeToString,
                        ),
                    },
                ),
            )
        )
        health = CheckOnlyHealth()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        credentials = grpc.ssl_server_credentials([(material.key, material.certificate)])
        try:
            listener.port = server.add_secure_port(f"{host}:{endpoint.port}", credentials)
        except RuntimeError as exc:  # grpc says no more than "Failed to bind": ask the OS why
            raise _bind_error(endpoint.host, endpoint.port) from exc
        await server.start()
        for service in ("", SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        listener.server = server
        return listener


def _bind_error(host: str, port: int) -> OSError:
    """The OS's own error for binding ``host:port`` (what the core says in words), found
    by binding a plain socket there as grpc would."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as error:
        return error
    return OSError(errno.EIO, f"grpc could not listen on {host}:{port}")


async def _check_tls(endpoint: Endpoint, material: TlsMaterial, where: str) -> None:
    """One TLS handshake first: gRPC would report an untrusted certificate as "unavailable".

    Done over a plain socket and memory BIOs, so that the socket is closed right here even
    when the attempt is cancelled (a race won by another transport) mid-handshake; the
    caller bounds the time.
    """
    loop = asyncio.get_running_loop()
    context = client_context(material.ca)
    context.set_alpn_protocols(["h2"])
    try:
        [(family, _, _, _, address), *_] = await loop.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM
        )
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            await _handshake(loop, sock, context, endpoint.verified_name)
    except ssl.SSLCertVerificationError as exc:
        raise TlsVerificationFailed(
            f"the certificate of {where} is not trusted: {exc.verify_message}"
        ) from exc
    except ssl.SSLError as exc:
        raise TransportError(f"TLS handshake with {where} failed: {exc.reason}") from exc
    except OSError as exc:
        raise ServerUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from exc


async def _handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext, host: str
) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            await loop.sock_sendall(sock, outgoing.read())
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionResetError("the server closed the connection") from None
            incoming.write(data)
        else:
            await loop.sock_sendall(sock, outgoing.read())
            return


class CheckOnlyHealth(health_aio.HealthServicer):
    """The standard health service without ``Watch``: a stranger's Watch call would hold
    its connection open for ever, past every pre-auth limit. ``Check`` answers as usual;
    health-checking clients treat ``UNIMPLEMENTED`` for Watch as "serving"."""

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:  # noqa: N802 - the service's name
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "use Check")


async def _until_the_client_ends(context: Context, session: ServerSession) -> None:
    # clients send nothing after opening the call: it lasts as long as their session. A
    # stranger's messages on it are not read (so grpc does not assemble them) until the
    # relay has authenticated it; a client that leaves cancels the call, which ends this
    await session.lifted.wait()
    while (await context.read()) is not grpc.aio.EOF:
        pass


def _peer_address(peer: str) -> str:
    """The address in grpc's peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]")


def _header(context: Context, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return str(value)
    return None


def _material(endpoint: Endpoint) -> TlsMaterial:
    if endpoint.material is None:
        raise TransportError("the gRPC transport needs the endpoint's TLS material (PEM)")
    return endpoint.material
