"""Peer streams through the relay as one byte stream, for peers with no direct path.

QUIC over DERP packets carries every peer session, but aioquic's per-packet work bounds it
far below a relayed tunnel. Here the peers run the TCP path's mutual TLS and the core
multiplexer over a byte stream the relay joins, exactly as on a direct TCP connection:
the relay carries ciphertext it cannot read or forge, since each peer pins the other's
certificate (its CA, published through the relay) and the acceptor checks which peer's
CA issued the client's. The controlling peer (the lower peer id) is the TLS client.

Two carriers, the cheaper first:

- ``relay-tcp`` (:data:`TICKETED`): each peer asks its relay session for a ticket
  (``peer_ticket``), opens a plain TCP connection to the relay's TLS port on the address
  its session reached and sends the ticket's preamble; the relay joins the two
  connections (``relay/tickets.py``) and TLS runs on the socket itself. The relay hop
  adds no encryption and no multiplexer of its own.
- ``relay-stream`` (:data:`KIND`): both peers open a stream of their relay session with
  ``peer_splice``, the relay joins the two (``relay/splice.py``), and TLS runs on one end
  of a local socket pair whose other end the core pump joins to the relay stream.

Both peers must take the same one: each says in the attempt's signalling which it can
take (``{carrier}``: ``relay-tcp`` once it holds a ticket and a connection to the relay's
port), and ``relay-tcp`` is used only when both can. A relay without tickets (older, or
without a TLS listener), a session that does not say which address it reached (a
WebSocket through a proxy), a refused connection, or a peer that says nothing (an
older client) mean ``relay-stream``; a relay without ``peer_splice`` ends that stream
without an answer, and a peer that does not know the signal never opens its side (the
relay then refuses after its ``handshake_timeout``): either way the attempt fails and
QUIC over DERP carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

from cloudbridge_core.errors import CloudBridgeError, P2PConnectionFailed
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.channel import AttemptChannel
from cloudbridge_core.p2p.identity import DeviceIdentity, server_name
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.p2p.tcp import (
    KEEPALIVE,
    PeerPipe,
    TcpLink,
    client_context,
    identify,
    server_context,
)
from cloudbridge_core.protocol.preamble import preamble, ticket_bytes
from cloudbridge_core.providers import PeerInfo, Stream
from cloudbridge_core.pump import PumpResult, connect, keep_alive, prepare, pump

log = get_logger("p2p.relayed")

#: the signal kind of these attempts (a peer that does not know it ignores it), and what
#: ``status`` names the carrier of a peer session on a relay stream (path ``derp``)
KIND = "relay-stream"
#: what ``status`` names the carrier on a raw connection through the relay's TLS port
TICKETED = "relay-tcp"
#: how long the TLS handshake through the relay may take
HANDSHAKE_TIMEOUT = 10.0
#: how long a closing link waits for the relay stream to finish before resetting it
CLOSE_TIMEOUT = 5.0
#: how long the connection to the relay's TLS port may take
DIAL_TIMEOUT = 5.0
#: how long to wait for the peer to say which carrier it can take (an older client never
#: says: it goes for the relay stream, which waits for this side longer than this)
OFFER_TIMEOUT = 5.0
#: after ``relay-tcp`` failed once both peers had taken it, attempts offer only the relay
#: stream for this long (something on the way may break raw connections every time)
TICKETED_PAUSE = 60.0


class RelayedLink(TcpLink):
    """The TLS connection to a peer through the relay, the pump that carries it over a
    relay stream (none on a raw connection), and which carrier it is (``protocol``)."""

    def __init__(
        self,
        pipe: PeerPipe,
        dialed: bool,
        carrier: asyncio.Task[PumpResult] | None,
        protocol: str,
    ) -> None:
        super().__init__(pipe, dialed, endpoint="relay")
        self._carrier = carrier
        self.protocol = protocol

    def abort(self) -> None:
        super().abort()
        if self._carrier is not None:
            self._carrier.cancel()  # the pump resets the relay stream

    async def aclose(self) -> None:
        await super().aclose()
        if self._carrier is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._carrier), CLOSE_TIMEOUT)
        self._carrier.cancel()
        await asyncio.gather(self._carrier, return_exceptions=True)


class RelayedConnector:
    """Connects the peer sessions of this device through the relay, on the cheapest
    carrier both peers can take."""

    def __init__(self, membership: Membership, identity: DeviceIdentity) -> None:
        self._membership = membership
        self._identity = identity
        #: why ``relay-tcp`` was not offered, each said at info once (then at debug)
        self._said: set[str] = set()
        #: ``relay-tcp`` is not offered before this (``time.monotonic()``)
        self._paused_until = 0.0

    async def connect(
        self, peer: PeerInfo, channel: AttemptChannel, controlling: bool
    ) -> RelayedLink:
        """The peer session's TLS connection to ``peer`` through the relay; raises
        :class:`P2PConnectionFailed` (the relay's refusal included)."""
        raw = await self._raw(peer, channel.attempt)
        try:
            both = await self._agree(peer, channel, raw is not None)
        except BaseException:
            if raw is not None:
                raw[0].close()
            raise
        if raw is None or not both:
            if raw is not None:
                raw[0].close()
            return await self._over_stream(peer, channel.attempt, controlling)
        sock, ticket = raw
        try:
            return await self._over_raw(sock, ticket, peer, controlling)
        except P2PConnectionFailed:
            self._paused_until = time.monotonic() + TICKETED_PAUSE
            raise

    async def _raw(self, peer: PeerInfo, attempt: int) -> tuple[socket.socket, bytes] | None:
        """A ticket and a connection to the relay's TLS port, or None (said why)."""
        if time.monotonic() < self._paused_until:
            self._say("paused after a failure", peer)
            return None
        try:
            issued, address = await self._membership.ticket(peer.peer_id, attempt)
            ticket = ticket_bytes(issued.ticket)
        except CloudBridgeError as error:  # an older relay, or one without a TLS listener
            self._say(f"no ticket: {error.message}", peer)
            return None
        except ValueError:
            self._say("no ticket: a malformed one", peer)
            return None
        if address is None:
            self._say("the relay session does not say which address it reached", peer)
            return None
        try:
            sock = await _dial(address, issued.port)
        except (OSError, TimeoutError) as error:
            reason = str(error) or f"no answer within {DIAL_TIMEOUT:g}s"
            self._say(f"no connection to the relay's TLS port: {reason}", peer)
            return None
        return sock, ticket

    async def _agree(self, peer: PeerInfo, channel: AttemptChannel, offered: bool) -> bool:
        """Whether both peers can take ``relay-tcp`` (each says so through the relay)."""
        await channel.send({"carrier": TICKETED if offered else KIND})
        try:
            said = await asyncio.wait_for(channel.receive(), OFFER_TIMEOUT)
        except TimeoutError:
            self._say("the peer did not say which carrier it can take (an older client)", peer)
            return False
        return offered and said.get("carrier") == TICKETED

    def _say(self, reason: str, peer: PeerInfo) -> None:
        level = log.debug if reason in self._said else log.info
        self._said.add(reason)
        level("relay_tcp_not_used", peer=peer.name, reason=reason)

    async def _over_raw(
        self, sock: socket.socket, ticket: bytes, peer: PeerInfo, controlling: bool
    ) -> RelayedLink:
        pipe = PeerPipe()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await asyncio.get_running_loop().sock_sendall(sock, preamble(ticket))
                await _handshake(pipe, sock, self._identity, peer, controlling)
        except BaseException as error:
            if pipe.transport is not None:
                pipe.abort()
            else:
                sock.close()
            _failed(error, peer, "a raw connection")
            raise
        return RelayedLink(pipe, controlling, None, TICKETED)

    async def _over_stream(self, peer: PeerInfo, attempt: int, controlling: bool) -> RelayedLink:
        try:
            stream, early = await self._membership.open_splice(peer.peer_id, attempt)
        except CloudBridgeError as error:
            raise P2PConnectionFailed(
                f"no relayed stream to {peer.name}: {error.message}"
            ) from error
        mine, theirs = socket.socketpair()
        prepare(mine)
        carrier = asyncio.ensure_future(_carry(stream, prepare(theirs), early))
        pipe = PeerPipe()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await _handshake(pipe, mine, self._identity, peer, controlling)
        except BaseException as error:
            if pipe.transport is not None:
                pipe.abort()
            else:
                mine.close()
            carrier.cancel()
            await asyncio.gather(carrier, return_exceptions=True)
            _failed(error, peer, "the relay")
            raise
        return RelayedLink(pipe, controlling, carrier, KIND)


async def _dial(address: str, port: int) -> socket.socket:
    """A TCP connection to ``address`` (an IP address) and ``port``; raises ``OSError`` or
    ``TimeoutError``."""
    family, kind, proto, _, resolved = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )[0]
    sock = prepare(socket.socket(family, kind, proto))
    try:
        async with asyncio.timeout(DIAL_TIMEOUT):
            await connect(sock, resolved)
    except BaseException:
        sock.close()
        raise
    keep_alive(sock, KEEPALIVE)
    return sock


def _failed(error: BaseException, peer: PeerInfo, through: str) -> None:
    """Raise :class:`P2PConnectionFailed` for a failed TLS handshake; other errors (a
    cancellation) go on."""
    if isinstance(error, OSError | TimeoutError | ValueError):  # ssl.SSLError is an OSError
        reason = str(error) or type(error).__name__
        raise P2PConnectionFailed(f"TLS with {peer.name} through {through}: {reason}") from None


async def _carry(stream: Stream, sock: socket.socket, early: bytes) -> PumpResult:
    """The relay stream's bytes to and from the local socket; what came with the relay's
    answer is passed on first (a socket pair's buffer holds a TLS handshake's)."""
    if early:
        try:
            sock.send(early)
        except OSError:
            sock.close()
            await stream.reset()
            raise
    return await pump(stream, sock)


async def _handshake(
    pipe: PeerPipe,
    sock: socket.socket,
    identity: DeviceIdentity,
    peer: PeerInfo,
    controlling: bool,
) -> None:
    loop = asyncio.get_running_loop()
    if controlling:
        await loop.create_connection(
            lambda: pipe,
            sock=sock,
            ssl=client_context(identity, peer),
            server_hostname=server_name(peer.peer_id),
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        return
    await loop.connect_accepted_socket(
        lambda: pipe,
        sock,
        ssl=server_context(identity, [peer]),
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    assert pipe.transport is not None  # connection_made ran
    ssl_object: ssl.SSLObject | None = pipe.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None or identify(der, [peer]) is None:
        raise ValueError(f"the certificate is not {peer.name}'s")
