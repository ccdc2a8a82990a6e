"""A direct path between two peers over TCP and TLS, for when one of them is reachable.

The QUIC session of :mod:`cloudbridge_core.p2p.session` carries every path (direct, STUN,
TURN, DERP) but its engine bounds it well below what a TLS tunnel carries; where one peer
can reach the other over TCP, this path carries the peer streams instead, on the core's
multiplexer (the same bounded streams as a relay session).

Each peer listens on TCP and, in each attempt, tells the other its endpoints through the
relay's signalling (``signal {kind: "tcp", body: {attempt, data: {endpoints}}}``); both dial
what the other sent. Authentication is mutual and as strong as the QUIC path's: the dialer
pins the acceptor's certificate (its CA, published through the relay), and the acceptor
requires a client certificate issued by the CA of a peer it knows. The controlling peer
(the lower peer id) decides which connection carries the session: its own dial when it
succeeds, else one the other peer dialed; it says so with :data:`CHOSEN` on that connection,
the other acknowledges with the same byte, and the multiplexer starts. Streams still open
with a ``peer_open`` header and its proof.

The TLS handshake also agrees on the multiplexer's limits (:data:`LIMITS`, by ALPN): both
peers must use the same, since a stream's send window is the other side's receive window.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aioice.ice import get_host_addresses
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from cloudbridge_core.accept import accept_forever
from cloudbridge_core.errors import P2PConnectionFailed
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity, server_name
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import PeerInfo, SignalChannel
from cloudbridge_core.pump import abort, keep_alive, prepare
from cloudbridge_core.tlsutil import load_key_pair
from cloudbridge_core.transports.mux_session import (
    HIGH_WATER,
    PREAUTH_HIGH_WATER,
    ProtocolPipe,
)
from cloudbridge_core.transports.preauth import Admission, PreauthGate, PreauthLimits

log = get_logger("p2p.tcp")

#: the signal kind of TCP path attempts (a peer that does not know it ignores it)
KIND = "tcp"
#: the TCP path's protocol versions, newest first (an older peer offers only the last)
ALPN = "cloudbridge-peer-tcp/2"
ALPN_V1 = "cloudbridge-peer-tcp/1"
#: the multiplexer's limits of each version. /2: the peer session's stream window (1 MiB,
#: as on QUIC and the relayed stream: what a peer may make this one buffer per stream, a
#: security limit) and frames as large as one read of a socket (256 KiB). Against /1 (a
#: relay session's limits) a bulk transfer takes fewer frames, writes to the target's
#: socket and window updates per byte, and its sender no longer waits for credit between
#: two reads of its socket (docs/performance.md, the TCP path)
LIMITS = {
    ALPN: MuxLimits(max_frame_size=256 * 1024, initial_window=1024 * 1024),
    ALPN_V1: MuxLimits(),
}
#: the controlling peer's word that this connection carries the session, and the answer
CHOSEN = b"\x01"
#: endpoints taken from a peer's signal; more are ignored (a security limit)
MAX_ENDPOINTS = 16
#: how long one dial (TCP and TLS) may take
DIAL_TIMEOUT = 5.0
#: how long a connection may wait for the controlling peer's choice and its answer
CHOICE_TIMEOUT = 10.0
#: strangers on the listener: the deadline for the TLS handshake (with the client
#: certificate), and how many may be pending at once (security limits)
PREAUTH = PreauthLimits(timeout=10.0, max_per_address=8, max_connections=64)
#: a connection that stops carrying (a peer gone without a FIN or RST) is noticed by the
#: kernel: keepalive probes when idle, and a bound on unacknowledged sends
KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 15000}

Verified = Callable[[PeerInfo, "TcpLink"], None]


class PeerPipe(ProtocolPipe):
    """The TLS connection's protocol, as relay sessions have it (so the multiplexer runs
    in its callbacks), counting the bytes each way for the peer's figures."""

    def __init__(self, high_water: int = HIGH_WATER) -> None:
        super().__init__(high_water)
        #: told of the bytes on the wire each way (sent, received)
        self.count: Callable[[int, int], None] = _ignore

    def data_received(self, data: bytes) -> None:
        self.count(0, len(data))
        super().data_received(data)

    def write_now(self, data: bytes | bytearray) -> None:
        self.count(len(data), 0)
        super().write_now(data)

    async def send(self, data: bytes | bytearray) -> None:
        self.count(len(data), 0)
        await super().send(data)

    def unread(self, data: bytes) -> None:
        """Put back ``data``, read past the choice: the multiplexer gets it first."""
        if data:
            self._chunks.appendleft(data)
            self._queued += len(data)


class TcpLink:
    """One authenticated TCP+TLS connection to a peer, and the pipe its multiplexer runs
    over once the connection is chosen."""

    def __init__(self, pipe: PeerPipe, dialed: bool, endpoint: str) -> None:
        self.pipe = pipe
        #: whether this side dialed (it is then the multiplexer's dialer)
        self.dialed = dialed
        self.endpoint = endpoint

    @property
    def limits(self) -> MuxLimits:
        """The multiplexer limits the handshake agreed on (:data:`LIMITS`; /1's when the
        peer chose none)."""
        transport = self.pipe.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        return LIMITS.get(chosen or ALPN_V1, LIMITS[ALPN_V1])

    async def send_chosen(self) -> None:
        await self.pipe.send(CHOSEN)

    async def expect_chosen(self, within: float) -> bool:
        """Whether the next byte is :data:`CHOSEN` (False at the end or on anything else);
        what follows it is left for the multiplexer."""
        try:
            data = await asyncio.wait_for(self.pipe.receive(), within)
        except (OSError, TimeoutError):
            return False
        if data[:1] != CHOSEN:
            return False
        self.pipe.unread(data[1:])
        return True

    def abort(self) -> None:
        self.pipe.abort()

    async def aclose(self) -> None:
        await self.pipe.aclose()


def _ignore(sent: int, received: int) -> None:
    """Bytes nobody counts."""


def identify(certificate: bytes, peers: Iterable[PeerInfo]) -> PeerInfo | None:
    """The peer whose published CA issued ``certificate`` (DER), or None.

    The TLS handshake proved the dialer holds the certificate's key and that some known
    CA issued it; this pins which peer: the one whose own CA signed it."""
    leaf = x509.load_der_x509_certificate(certificate)
    for peer in peers:
        try:
            ca = x509.load_pem_x509_certificate(peer.certificate.encode())
            if ca.subject == leaf.issuer:
                leaf.verify_directly_issued_by(ca)
                return peer
        except (ValueError, TypeError, InvalidSignature):
            continue
    return None


def client_context(identity: DeviceIdentity, peer: PeerInfo) -> ssl.SSLContext:
    """Dial ``peer``: pin its published CA, present this device's certificate."""
    context = ssl.create_default_context(cadata=peer.certificate)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(list(LIMITS))
    load_key_pair(context, identity.server)
    return context


def server_context(identity: DeviceIdentity, peers: Iterable[PeerInfo]) -> ssl.SSLContext:
    """Accept a dialing peer: a client certificate issued by one of ``peers``' CAs is
    required (:func:`identify` then says whose)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(list(LIMITS))  # the first the dialer offers too is chosen
    context.num_tickets = 0  # no resumption between peers: every connection is verified
    load_key_pair(context, identity.server)
    context.verify_mode = ssl.CERT_REQUIRED
    cas = "".join(peer.certificate for peer in peers)
    if cas:
        context.load_verify_locations(cadata=cas)
    return context


def local_endpoints(port: int, addresses: Sequence[str] | None = None) -> list[str]:
    """``host:port`` for each of this machine's addresses (those ICE offers as host
    candidates, IPv6 too), or for ``addresses`` when given."""
    hosts = addresses if addresses is not None else get_host_addresses(True, True)
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts][:MAX_ENDPOINTS]


def parse_endpoints(data: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The peer's endpoints from its signal; what is malformed is left out."""
    endpoints = data.get("endpoints")
    found: list[tuple[str, int]] = []
    if not isinstance(endpoints, list):
        return found
    for endpoint in endpoints[:MAX_ENDPOINTS]:
        if not isinstance(endpoint, str):
            continue
        host, _, port = endpoint.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            found.append((host.strip("[]"), int(port)))
    return found


class PeerTcpListener:
    """This device's TCP endpoint for peers. A stranger gets the pre-auth budget
    (:data:`PREAUTH`) until its client certificate names a known peer; then ``verified``
    gets the connection."""

    def __init__(
        self,
        identity: DeviceIdentity,
        peers: Callable[[], Iterable[PeerInfo]],
        verified: Verified,
        addresses: Sequence[str] | None = None,
    ) -> None:
        self._identity = identity
        self._peers = peers
        self._verified = verified
        self._addresses = addresses
        self._gate = PreauthGate(lambda: PREAUTH)
        self._context: tuple[frozenset[str], ssl.SSLContext] | None = None
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "", port: int = 0) -> None:
        """Listen on ``host`` (default: every address, IPv6 too where the host has it)."""
        sock: socket.socket | None = None
        if socket.has_dualstack_ipv6() and not host:
            with contextlib.suppress(OSError):  # IPv6 may be off (a bare namespace)
                sock = socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
                )
        if sock is None:
            sock = socket.create_server((host, port), backlog=128)
        sock.setblocking(False)
        self._socket = sock
        self._acceptor = asyncio.get_running_loop().create_task(
            accept_forever(sock, self._accepted)
        )

    def endpoints(self) -> list[str]:
        """What the peers are told to dial (nothing once closed)."""
        if self._socket is None:
            return []
        return local_endpoints(self._socket.getsockname()[1], self._addresses)

    def _accepted(self, connection: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        admission = self._gate.admit(str(host)) if host is not None else None
        if admission is None:  # over a cap (counted by the gate)
            abort(connection)
            return
        task = asyncio.get_running_loop().create_task(
            self._handshake(connection, address, admission)
        )
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _server_context(self) -> ssl.SSLContext:
        """One context while the peers stay the same (a new one drops departed CAs)."""
        peers = list(self._peers())
        key = frozenset(peer.certificate for peer in peers)
        if self._context is None or self._context[0] != key:
            self._context = (key, server_context(self._identity, peers))
        return self._context[1]

    async def _handshake(
        self, connection: socket.socket, address: Any, admission: Admission
    ) -> None:
        pipe = PeerPipe(PREAUTH_HIGH_WATER)
        peer: PeerInfo | None = None
        try:
            keep_alive(connection, KEEPALIVE)
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: pipe,
                prepare(connection),
                ssl=self._server_context(),
                ssl_handshake_timeout=max(admission.remaining(), 0.001),
            )
            assert pipe.transport is not None  # connection_made ran
            ssl_object = pipe.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            peer = identify(der, self._peers()) if der else None
        except BaseException as exc:
            abort(connection)
            admission.release()
            if isinstance(exc, OSError | ValueError):  # a failed handshake, a bad certificate
                log.info("peer_tcp_refused", address=str(address[0]), reason=str(exc))
                return
            raise
        admission.release()
        if peer is None:
            log.info("peer_tcp_refused", address=str(address[0]), reason="not a known peer")
            pipe.abort()
            return
        pipe.authenticated()
        self._verified(peer, TcpLink(pipe, dialed=False, endpoint=_endpoint(address)))

    async def aclose(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
            self._acceptor = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)


def _endpoint(address: Any) -> str:
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host.removeprefix("::ffff:")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def dial(
    identity: DeviceIdentity, peer: PeerInfo, endpoints: Sequence[tuple[str, int]]
) -> TcpLink:
    """A verified connection to the first of ``endpoints`` that answers (all are tried at
    once); raises :class:`P2PConnectionFailed` when none does."""
    if not endpoints:
        raise P2PConnectionFailed(f"{peer.name} published no TCP endpoint")
    context = client_context(identity, peer)
    attempts = [asyncio.ensure_future(_dial_one(context, peer, e)) for e in endpoints]
    errors: list[str] = []
    winner: TcpLink | None = None
    try:
        for next_done in asyncio.as_completed(attempts):
            try:
                winner = await next_done
                return winner
            except (OSError, TimeoutError) as error:
                errors.append(str(error) or type(error).__name__)
    finally:
        for attempt in attempts:
            attempt.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        for attempt in attempts:  # one that connected before its cancellation took effect
            late = not attempt.cancelled() and attempt.exception() is None
            if late and attempt.result() is not winner:
                await attempt.result().aclose()
    raise P2PConnectionFailed(f"no TCP endpoint of {peer.name} answered: {'; '.join(errors)}")


async def _dial_one(context: ssl.SSLContext, peer: PeerInfo, endpoint: tuple[str, int]) -> TcpLink:
    host, port = endpoint
    pipe = PeerPipe()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(DIAL_TIMEOUT):
        transport, _ = await loop.create_connection(
            lambda: pipe,
            host,
            port,
            ssl=context,
            server_hostname=server_name(peer.peer_id),
            ssl_handshake_timeout=DIAL_TIMEOUT,
        )
    sock = transport.get_extra_info("socket")
    if sock is not None:
        keep_alive(sock, KEEPALIVE)
    return TcpLink(pipe, dialed=True, endpoint=_endpoint((host, port)))


class TcpAttempt:
    """One attempt at a TCP path with one peer, run by both sides at once."""

    def __init__(
        self,
        identity: DeviceIdentity,
        peer: PeerInfo,
        channel: SignalChannel,
        listener: PeerTcpListener | None,
    ) -> None:
        self._identity = identity
        self._peer = peer
        self._channel = channel
        self._listener = listener
        #: connections the peer dialed during this attempt, verified
        self._incoming: asyncio.Queue[TcpLink] = asyncio.Queue(maxsize=4)

    def offer(self, link: TcpLink) -> bool:
        """Take a connection the peer dialed; False when this attempt has no room for it."""
        try:
            self._incoming.put_nowait(link)
        except asyncio.QueueFull:
            return False
        return True

    async def run(self) -> TcpLink:
        """The connection that carries the session, chosen and acknowledged; raises
        :class:`P2PConnectionFailed` (the caller bounds the whole attempt in time)."""
        mine = self._listener.endpoints() if self._listener is not None else []
        await self._channel.send({"endpoints": mine})
        theirs = parse_endpoints(await self._channel.receive())
        try:
            if self._channel.controlling:
                return await self._choose(theirs)
            return await self._follow(theirs)
        finally:
            while not self._incoming.empty():  # not chosen: dropped at once
                self._incoming.get_nowait().abort()

    async def _choose(self, endpoints: Sequence[tuple[str, int]]) -> TcpLink:
        try:
            link = await dial(self._identity, self._peer, endpoints)
        except P2PConnectionFailed as error:
            log.info("peer_tcp_dial_failed", peer=self._peer.name, reason=error.message)
            link = await self._incoming.get()  # the peer's dial, if it gets through
        try:
            await link.send_chosen()
            taken = await link.expect_chosen(CHOICE_TIMEOUT)
        except BaseException as error:  # the connection ended, or the attempt's time is up
            link.abort()
            if isinstance(error, OSError):
                raise P2PConnectionFailed(
                    f"the TCP connection to {self._peer.name} ended"
                ) from error
            raise
        if not taken:
            link.abort()
            raise P2PConnectionFailed(f"{self._peer.name} did not take the TCP connection")
        return link

    async def _follow(self, endpoints: Sequence[tuple[str, int]]) -> TcpLink:
        chosen: asyncio.Future[TcpLink] = asyncio.get_running_loop().create_future()
        judging: set[asyncio.Task[None]] = set()

        async def judge(link: TcpLink) -> None:
            try:
                taken = await link.expect_chosen(CHOICE_TIMEOUT)
            except BaseException:
                link.abort()
                raise
            if taken and not chosen.done():
                chosen.set_result(link)
            else:
                await link.aclose()

        def judge_later(link: TcpLink) -> None:
            task = asyncio.ensure_future(judge(link))
            judging.add(task)
            task.add_done_callback(judging.discard)

        async def dialing() -> None:
            with contextlib.suppress(P2PConnectionFailed):
                judge_later(await dial(self._identity, self._peer, endpoints))

        async def accepting() -> None:
            while True:
                judge_later(await self._incoming.get())

        helpers = [asyncio.ensure_future(dialing()), asyncio.ensure_future(accepting())]
        try:
            link = await chosen
        except BaseException:  # the attempt's time is up: no connection is left open
            if chosen.done() and not chosen.cancelled():
                chosen.result().abort()
            raise
        finally:
            for task in [*helpers, *judging]:
                task.cancel()
            await asyncio.gather(*helpers, *judging, return_exceptions=True)
        try:
            await link.send_chosen()
        except BaseException as error:
            link.abort()
            if isinstance(error, OSError):
                raise P2PConnectionFailed(
                    f"the TCP connection to {self._peer.name} ended"
                ) from error
            raise
        return link
