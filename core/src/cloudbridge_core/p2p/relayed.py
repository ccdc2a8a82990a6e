"""Peer streams through the relay as one byte stream, for peers with no direct path.

QUIC over DERP packets carries every peer session, but aioquic's per-packet work bounds it
far below a relayed tunnel. Here both peers open a stream of their relay session with
``peer_splice`` (the other's peer id and the attempt number), the relay joins the two
(``relay/splice.py``), and the peers run the TCP path's mutual TLS and the core
multiplexer over it, exactly as on a direct TCP connection: the relay carries ciphertext
it cannot read or forge, since each peer pins the other's certificate (its CA, published
through the relay) and the acceptor checks which peer's CA issued the client's.

TLS runs on one end of a local socket pair, whose other end the core pump joins to the
relay stream: the TCP path's code is used unchanged, and the pump moves the bytes
without tasks where the relay session is the core multiplexer. The controlling peer (the
lower peer id) is the TLS client.

A relay without ``peer_splice`` ends the stream without an answer, and a peer that does
not know the signal never opens its side (the relay then refuses after its
``handshake_timeout``): either way the attempt fails and QUIC over DERP carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from cloudbridge_core.errors import CloudBridgeError, P2PConnectionFailed
from cloudbridge_core.p2p.identity import DeviceIdentity, server_name
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.p2p.tcp import PeerPipe, TcpLink, client_context, identify, server_context
from cloudbridge_core.providers import PeerInfo, Stream
from cloudbridge_core.pump import PumpResult, prepare, pump

#: the signal kind of these attempts (a peer that does not know it ignores it), and what
#: ``status`` names the carrier of a peer session on it (path ``derp``)
KIND = "relay-stream"
#: how long the TLS handshake through the relay may take
HANDSHAKE_TIMEOUT = 10.0
#: how long a closing link waits for the relay stream to finish before resetting it
CLOSE_TIMEOUT = 5.0


class RelayedLink(TcpLink):
    """The TLS connection to a peer through the relay, and the pump that carries it."""

    def __init__(self, pipe: PeerPipe, dialed: bool, carrier: asyncio.Task[PumpResult]) -> None:
        super().__init__(pipe, dialed, endpoint="relay")
        self._carrier = carrier

    def abort(self) -> None:
        super().abort()
        self._carrier.cancel()  # the pump resets the relay stream

    async def aclose(self) -> None:
        await super().aclose()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._carrier), CLOSE_TIMEOUT)
        self._carrier.cancel()
        await asyncio.gather(self._carrier, return_exceptions=True)


async def connect(
    membership: Membership,
    identity: DeviceIdentity,
    peer: PeerInfo,
    attempt: int,
    controlling: bool,
) -> RelayedLink:
    """The peer session's TLS connection to ``peer`` through the relay; raises
    :class:`P2PConnectionFailed` (the relay's refusal included)."""
    try:
        stream, early = await membership.open_splice(peer.peer_id, attempt)
    except CloudBridgeError as error:
        raise P2PConnectionFailed(f"no relayed stream to {peer.name}: {error.message}") from error
    mine, theirs = socket.socketpair()
    prepare(mine)
    carrier = asyncio.ensure_future(_carry(stream, prepare(theirs), early))
    pipe = PeerPipe()
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await _handshake(pipe, mine, identity, peer, controlling)
    except BaseException as error:
        if pipe.transport is not None:
            pipe.abort()
        else:
            mine.close()
        carrier.cancel()
        await asyncio.gather(carrier, return_exceptions=True)
        if isinstance(error, OSError | TimeoutError | ValueError):  # ssl.SSLError is an OSError
            reason = str(error) or type(error).__name__
            raise P2PConnectionFailed(f"TLS with {peer.name} through the relay: {reason}") from None
        raise
    return RelayedLink(pipe, controlling, carrier)


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
