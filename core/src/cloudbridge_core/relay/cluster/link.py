"""Relay-to-relay links: DERP packets between devices whose sessions are on different
relays of a cluster. Redis carries state and small messages; these links carry the bytes.

**Who is a member.** Every relay of a cluster holds the cluster's CA (the shared state
directory). Each issues itself, at start, a member certificate from that CA
(:func:`~cloudbridge_core.tlsutil.issue_member_certificate`): usable as TLS server and
client, and marked with the extended key usage
:data:`~cloudbridge_core.tlsutil.CLUSTER_MEMBER_USAGE`, a private OID that no other
certificate the relay issues carries — its ordinary server certificate, the one its clients
see, is signed by the same CA but is not a member's. A link is mutual TLS 1.3: each end
requires the other's certificate to chain to the cluster CA *and* to carry that marking;
host names are not checked (members are reached at any address). The server then writes
one byte, :data:`ACCEPTED`, so that the dialer knows it was taken for a member (in TLS 1.3
a server refuses a client certificate only after the client's handshake has ended).

**Direction.** A link carries packets one way, from the relay that dialled it: relay A
sends to B on A's link to B, and B answers on its own link to A. The server never writes
after :data:`ACCEPTED`; the dialer never reads after it.

**Framing** after :data:`ACCEPTED`: see :mod:`.link_frames`.

**Best effort.** :meth:`LinkPool.send` never waits: it batches packets per link and hands
them to the socket once per loop turn; when a link's batch or the socket's buffer is over
its bound (``queue_bytes``), or the link is down and waiting to be tried again, the packet
is dropped (``False``), as DERP drops for a slow device.

Metrics: :class:`LinkMetrics` defines ``cloudbridge_relay_cluster_link_bytes_total``
(``direction="sent|received"``: frame bytes handed to, and read from, the links) and
``cloudbridge_relay_cluster_link_packets_dropped_total``, in the registry it is given.

Use (in an event loop; ``deliver`` hands a packet to a device of this relay)::

    metrics = LinkMetrics(registry)
    identity = LinkIdentity.issue(state.ca, member_name)  # a fresh certificate each start
    server = await LinkServer.start(link_host, link_port, identity, deliver, metrics=metrics)
    pool = LinkPool(identity, metrics=metrics)
    pool.send(other_member, "10.0.0.2:7480", tenant_id, sender_key, target_key, payload)
    pool.forget(other_member)  # it left the cluster, or its presence expired
    await pool.aclose()
    await server.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from prometheus_client import CollectorRegistry, Counter

from cloudbridge_core import tlsutil
from cloudbridge_core.accept import accept_forever
from cloudbridge_core.errors import (
    AddressInUse,
    CloudBridgeError,
    ConnectionTimeout,
    ProtocolViolation,
    TlsVerificationFailed,
    TransportClosed,
    TransportError,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.pump import abort, keep_alive, prepare
from cloudbridge_core.relay.cluster.link_frames import PacketReader, encode_packet
from cloudbridge_core.retry import Backoff

log = get_logger("relay.cluster.link")

#: a link's application protocol; a future version is chosen by ALPN
LINK_ALPN = "cloudbridge-link/1"
#: what the server writes once it has taken the dialer for a member
ACCEPTED = b"\x01"
#: the deadline of a TLS handshake on a link (a security limit)
HANDSHAKE_TIMEOUT = 10.0
#: links accepted but not yet authenticated, at most (a security limit)
MAX_UNAUTHENTICATED = 64
#: bytes waiting for one member, at most: in its batch, and again in its socket's buffer
QUEUE_BYTES = 1 << 20
#: the wait before a link that failed is tried again (a packet for it meanwhile is dropped)
RECONNECT = Backoff(initial_delay=0.2, multiplier=2.0, max_delay=10.0, jitter=0.2, max_retries=0)
#: bytes read from a link at once
READ_SIZE = 1 << 16
#: a member whose host vanished is noticed in about a minute
KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 45000}

#: ``deliver(tenant_id, sender_key, target_key, payload)``: hand a packet to a device of
#: this relay; True when it was. It must not raise.
Deliver = Callable[[str, bytes, bytes, bytes], Awaitable[bool]]


class LinkMetrics:
    """The links' counters, in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter(
            "cloudbridge_relay_cluster_link_bytes",
            "Bytes of packets carried on links to other relays of the cluster (sent, received).",
            ["direction"],
            registry=registry,
        )
        self.sent = self.bytes.labels("sent")
        self.received = self.bytes.labels("received")
        self.dropped = Counter(
            "cloudbridge_relay_cluster_link_packets_dropped",
            "Packets for another relay dropped: its link was down, or its queue full.",
            registry=registry,
        )


@dataclass(frozen=True)
class LinkIdentity:
    """What a member presents and trusts on its links: its ``certificate``
    (:func:`~cloudbridge_core.tlsutil.issue_member_certificate`) and the cluster's CA."""

    name: str
    ca_certificate: bytes
    certificate: tlsutil.KeyPair

    @classmethod
    def issue(cls, ca: tlsutil.KeyPair, name: str) -> LinkIdentity:
        """A fresh member certificate for ``name`` from the cluster's ``ca``."""
        return cls(name, ca.certificate, tlsutil.issue_member_certificate(ca, name))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        return self._completed(context)

    def client_context(self) -> ssl.SSLContext:
        # check_hostname: the member name every member certificate holds, not an address
        return self._completed(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    def _completed(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cadata=self.ca_certificate.decode())
        context.set_alpn_protocols([LINK_ALPN])
        tlsutil.load_key_pair(context, self.certificate)
        return context


def _member_of(transport: asyncio.BaseTransport) -> str | None:
    """The member at the other end of a TLS link, or None if it is not one."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != LINK_ALPN:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return tlsutil.member_name(der) if der else None


async def _listening_socket(host: str, port: int) -> socket.socket:
    if not host and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    return socket.create_server(address, family=family)


class LinkServer:
    """Accepts links from the other members and hands their packets to ``deliver``."""

    def __init__(
        self,
        identity: LinkIdentity,
        deliver: Deliver,
        *,
        handshake_timeout: float,
        max_unauthenticated: int,
        metrics: LinkMetrics | None,
    ) -> None:
        self._tls = identity.server_context()
        self._deliver = deliver
        self._handshake_timeout = handshake_timeout
        self._max_unauthenticated = max_unauthenticated
        self._metrics = metrics or LinkMetrics(CollectorRegistry())
        self._unauthenticated = 0
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._members: dict[asyncio.Task[None], str] = {}

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        identity: LinkIdentity,
        deliver: Deliver,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        metrics: LinkMetrics | None = None,
    ) -> LinkServer:
        """Listen on ``host:port`` (the first address ``host`` resolves to; every address,
        IPv4 and IPv6, when empty). Raises ``AddressInUse``, or ``CloudBridgeError`` for any other
        address that cannot be had."""
        server = cls(
            identity,
            deliver,
            handshake_timeout=handshake_timeout,
            max_unauthenticated=max_unauthenticated,
            metrics=metrics,
        )
        where = f"{host}:{port}"
        try:
            server._socket = await _listening_socket(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"the relay cannot listen for cluster links on {where}: the port is in use",
                    hint="set server.cluster.link_port",
                ) from exc
            raise CloudBridgeError(
                f"the relay cannot listen for cluster links on {where}: {exc.strerror or exc}",
                hint="check server.cluster.link_host and server.cluster.link_port",
            ) from exc
        server._socket.setblocking(False)
        server._acceptor = asyncio.get_running_loop().create_task(
            accept_forever(server._socket, server._accepted)
        )
        return server

    @property
    def port(self) -> int:
        assert self._socket is not None  # set by start
        port: int = self._socket.getsockname()[1]
        return port

    def members(self) -> list[str]:
        """The members linked to this relay now (a member may hold several links while
        an old one is not yet noticed gone)."""
        return sorted(self._members.values())

    def _accepted(self, connection: socket.socket, address: object) -> None:
        if self._unauthenticated >= self._max_unauthenticated:
            abort(connection)
            return
        self._unauthenticated += 1
        task = asyncio.get_running_loop().create_task(self._serve(connection, address))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, connection: socket.socket, address: object) -> None:
        peer = str(address[0]) if isinstance(address, tuple) else "unknown"
        reader = asyncio.StreamReader(limit=READ_SIZE)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            keep_alive(prepare(connection), KEEPALIVE)
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: protocol,
                connection,
                ssl=self._tls,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            abort(connection)
            log.warning("cluster_link_refused", address=peer, reason=exc.verify_message)
            return
        except OSError as exc:  # no handshake in time, or not TLS: a scanner, most likely
            abort(connection)
            log.debug("cluster_link_handshake_failed", address=peer, reason=str(exc))
            return
        except BaseException:  # the server closing
            abort(connection)
            raise
        finally:
            self._unauthenticated -= 1
        try:
            await self._carry(transport, reader, peer)
        finally:
            transport.abort()

    async def _carry(
        self, transport: asyncio.Transport, reader: asyncio.StreamReader, peer: str
    ) -> None:
        """A link whose TLS handshake is done: a member's packets, or a refusal."""
        member = _member_of(transport)
        if member is None:
            log.warning("cluster_link_refused", address=peer, reason="not a cluster member")
            return
        task = asyncio.current_task()
        assert task is not None
        self._members[task] = member
        transport.write(ACCEPTED)
        log.info("cluster_link_accepted", member=member, address=peer)
        try:
            await self._receive(reader)
        except ProtocolViolation as exc:
            log.warning("cluster_link_protocol_violation", member=member, reason=exc.message)
        except OSError as exc:  # reset, or TLS broken
            log.info("cluster_link_closed", member=member, reason=str(exc))
        else:
            log.info("cluster_link_closed", member=member, reason="closed by the member")
        finally:
            del self._members[task]

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        packets = PacketReader()
        received = self._metrics.received
        deliver = self._deliver
        while data := await reader.read(READ_SIZE):
            received.inc(len(data))
            for packet in packets.feed(data):
                await deliver(
                    packet.tenant_id, packet.sender_key, packet.target_key, packet.payload
                )

    async def aclose(self) -> None:
        """Stop listening and close every link (idempotent)."""
        if self._socket is None:
            return
        assert self._acceptor is not None
        self._acceptor.cancel()
        await asyncio.gather(self._acceptor, return_exceptions=True)
        self._socket.close()
        self._socket = None
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)


class LinkPool:
    """This relay's links to the other members, by member name: opened on the first
    packet for a member, one at a time, tried again after a failure once
    ``backoff`` has passed, closed by :meth:`forget` and :meth:`aclose`."""

    def __init__(
        self,
        identity: LinkIdentity,
        *,
        queue_bytes: int = QUEUE_BYTES,
        connect_timeout: float = HANDSHAKE_TIMEOUT,
        backoff: Backoff = RECONNECT,
        metrics: LinkMetrics | None = None,
    ) -> None:
        self.tls = identity.client_context()
        self.queue_bytes = queue_bytes
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.metrics = metrics or LinkMetrics(CollectorRegistry())
        self._links: dict[str, _Link] = {}
        self._closed = False

    def send(
        self,
        name: str,
        address: str,
        tenant_id: str,
        sender_key: bytes,
        target_key: bytes,
        payload: bytes,
    ) -> bool:
        """Queue a packet for member ``name``, reached at ``address`` (``host:port``);
        False when it is dropped (link down, queue full, pool closed). Never waits.
        Raises ``ValueError`` for a packet no member would take (see :func:`encode_packet`).
        """
        frame = encode_packet(tenant_id, sender_key, target_key, payload)
        link = self._links.get(name)
        if link is None or link.address != address:  # a member that moved is dialled anew
            if link is not None:
                link.close()
            if self._closed:
                self.metrics.dropped.inc()
                return False
            link = self._links[name] = _Link(self, name, address)
        if link.send(frame):
            return True
        self.metrics.dropped.inc()
        return False

    def connected(self) -> list[str]:
        """The members this relay has a link up to now."""
        return sorted(name for name, link in self._links.items() if link.up)

    def forget(self, name: str) -> None:
        """Close the link to ``name`` (a member that left); a later send dials anew."""
        link = self._links.pop(name, None)
        if link is not None:
            link.close()

    async def aclose(self) -> None:
        """Close every link; sends after this are dropped (idempotent)."""
        self._closed = True
        links, self._links = list(self._links.values()), {}
        attempts = [link.close() for link in links]
        await asyncio.gather(*filter(None, attempts), return_exceptions=True)


class _Link(asyncio.Protocol):
    """One outbound link: its batch of frames, its connection, its backoff."""

    def __init__(self, pool: LinkPool, name: str, address: str) -> None:
        self._pool = pool
        self.name = name
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._flush_scheduled = False
        #: the connection, from TLS done until lost; carries frames once ``up``
        self._transport: asyncio.Transport | None = None
        self.up = False
        #: the server's answer to this dial (``ACCEPTED``, or the reason it has none)
        self._answer: asyncio.Future[None] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._paused = False
        self._failures = 0
        self._retry_at = 0.0
        self._closed = False

    def send(self, frame: bytes) -> bool:
        if self._paused or self._batch_bytes + len(frame) > self._pool.queue_bytes:
            return False
        if self.up:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        elif self._opening is None:
            if self._closed or self._loop.time() < self._retry_at:
                return False
            self._opening = self._loop.create_task(self._open())
        self._batch.append(frame)
        self._batch_bytes += len(frame)
        return True

    def _flush(self) -> None:
        """Hand the batch to TLS at once: a record and a write per loop turn, not per packet."""
        self._flush_scheduled = False
        if not self.up or not self._batch:
            return
        assert self._transport is not None
        data = b"".join(self._batch)
        self._batch.clear()
        self._batch_bytes = 0
        self._transport.write(data)
        self._pool.metrics.sent.inc(len(data))

    async def _open(self) -> None:
        host, _, port = self.address.rpartition(":")
        answer = self._answer = self._loop.create_future()
        try:
            async with asyncio.timeout(self._pool.connect_timeout):
                await self._loop.create_connection(
                    lambda: self,
                    host.strip("[]"),
                    int(port),
                    ssl=self._pool.tls,
                    server_hostname=tlsutil.MEMBER_SAN,
                    ssl_handshake_timeout=self._pool.connect_timeout,
                )
                await answer
        except (OSError, ValueError, CloudBridgeError) as exc:
            self._failed(_classified(exc, self.address, self._pool.connect_timeout))
            return
        finally:
            self._opening = None
            self._answer = None
            answer.cancel()  # or settled; its failure is reported above, once
            if not answer.cancelled():
                answer.exception()
        self.up = True
        self._failures = 0
        log.info("cluster_link_up", member=self.name, address=self.address)
        self._flush()

    def _failed(self, error: CloudBridgeError) -> None:
        self.up = False
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._batch.clear()
        self._batch_bytes = 0
        self._paused = False
        delay = self._pool.backoff.delay_for(self._failures)
        self._failures += 1
        self._retry_at = self._loop.time() + delay
        if not self._closed:
            log.warning(
                "cluster_link_down",
                member=self.name,
                address=self.address,
                code=error.code,
                reason=error.message,
                retry_in=round(delay, 2),
            )

    def close(self) -> asyncio.Task[None] | None:
        """Close the link; returns the attempt to open it, cancelled, if there was one."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._opening is not None:
            self._opening.cancel()
        return self._opening

    # asyncio.Protocol: what the connection tells the link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport does not derive from asyncio.Transport, but is one
        transport = cast(asyncio.Transport, transport)
        if _member_of(transport) is None:
            transport.abort()
            self._settle(TlsVerificationFailed(f"{self.address} is not a cluster member"))
            return
        self._transport = transport
        transport.set_write_buffer_limits(high=self._pool.queue_bytes)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not a TCP socket: nothing to keep alive
                keep_alive(sock, KEEPALIVE)

    def data_received(self, data: bytes) -> None:
        if data == ACCEPTED and not self.up:
            self._settle(None)
            return
        assert self._transport is not None
        self._transport.abort()
        self._settle(ProtocolViolation(f"{self.address} wrote on a link it only reads"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._settle(TransportClosed(f"{self.address} closed the link before accepting it"))
        if self.up:
            self._failed(TransportClosed(f"{self.address} closed the link"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def _settle(self, error: CloudBridgeError | None) -> None:
        """The server's answer to the dialer: taken for a member (None), or not."""
        if self._answer is None or self._answer.done():
            return
        if error is None:
            self._answer.set_result(None)
        else:
            self._answer.set_exception(error)


def _classified(exc: Exception, address: str, timeout: float) -> CloudBridgeError:
    if isinstance(exc, CloudBridgeError):
        return exc
    if isinstance(exc, TimeoutError):
        return ConnectionTimeout(f"no link to {address} within {timeout}s")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsVerificationFailed(
            f"{address} is not a member of this cluster: {exc.verify_message}"
        )
    if isinstance(exc, ssl.SSLError):  # an alert: most often, it refused our certificate
        return TransportError(f"TLS with {address} failed: {exc.reason}")
    if isinstance(exc, ValueError):  # a port that is not a number
        return TransportClosed(f"{address} is not a host:port")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return TransportClosed(f"no link to {address}: {reason}")
