"""Peer sessions pass the transport conformance kit, on a real UDP path over loopback,
and on a TCP path.

Two :class:`PeerSession` objects, each with its own device identity, talk QUIC over a pair
of UDP sockets on 127.0.0.1 (a direct path, as ICE would nominate between two hosts; ICE
itself is left out because aioice offers only the machine's other interfaces). The kit's
checks about a relay's listener do not apply to a session between peers and are left
out: connect_timeout and untrusted_certificate_rejected (no endpoint to connect to: the
peer's certificate is pinned from the relay's announcement), oversized_frame_rejected (no
listener serving strangers) and preauth_budget_held (peers are authenticated before any
datagram flows: only a peer announced by the relay gets a session).

On the TCP path, two peer sessions talk over a TCP+TLS connection on 127.0.0.1 that one
dialed and the other's :class:`PeerTcpListener` accepted (mutual TLS, each pinning the
other's CA); no QUIC session runs, so every stream takes the TCP path. The same checks
are left out (the listener's own refusals are in tests/test_p2p_tcp.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from cloudbridge_core.errors import TransportClosed
from cloudbridge_core.p2p import tcp
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.session import PeerSession
from cloudbridge_core.providers import Session, Stream, Transport
from cloudbridge_core.testing.conformance import (
    CHECKS,
    Handler,
    TransportKit,
    connect_timeout,
    large_payload_integrity,
    oversized_frame_rejected,
    preauth_budget_held,
    run_check,
    slow_reader_bounds_memory,
    untrusted_certificate_rejected,
)
from cloudbridge_core.testing.loopback_paths import (
    BatchingUdpPath,
    UdpPath,
    peer_info,
    udp_paths,
)

pytestmark = pytest.mark.timeout(90)

RELAY_ENDPOINT_CHECKS = {
    connect_timeout,
    untrusted_certificate_rejected,
    oversized_frame_rejected,
    preauth_budget_held,
}
PEER_CHECKS = [check for check in CHECKS if check not in RELAY_ENDPOINT_CHECKS]


class PeerEnd:
    """One peer's :class:`PeerSession` seen as a :class:`Session`: the streams the peer
    opens are served by queueing them for ``accept_stream``. With ``link``, the session
    carries its streams on that TCP path; without, on its QUIC session."""

    def __init__(
        self, identity: DeviceIdentity, other: DeviceIdentity, link: tcp.TcpLink | None = None
    ) -> None:
        self._incoming: asyncio.Queue[Stream] = asyncio.Queue()
        controlling = identity.peer_id < other.peer_id
        self.session = PeerSession(identity, peer_info(other), controlling, self._serve)
        self._on_tcp = link is not None
        if link is not None:
            self.session.attach_tcp(link)
            assert self.session.protocol == "tcp"

    async def _serve(self, stream: Stream) -> None:
        self._incoming.put_nowait(stream)

    async def open_stream(self) -> Stream:
        return await self.session.open_stream()

    async def accept_stream(self) -> Stream:
        if self._on_tcp:
            carried = self.session.carried_by("tcp")
            if carried is None:
                raise TransportClosed("the TCP path has ended")
            carrier_ended = carried[0].wait_closed()
        else:
            await self.session.wait_connected(10)
            protocol = self.session._protocol
            assert protocol is not None
            carrier_ended = protocol.wait_closed()
        # the carrier's end is what ends accepting, as on a relay
        incoming = asyncio.ensure_future(self._incoming.get())
        ended = asyncio.ensure_future(carrier_ended)
        await asyncio.wait({incoming, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if incoming.done():
            return incoming.result()
        incoming.cancel()
        raise TransportClosed("the peer session has ended")

    def authenticated(self) -> None:
        """Peers are authenticated before their session starts."""

    async def aclose(self) -> None:
        await self.session.aclose()


class PeerSessionKit(TransportKit):
    """The kit's ``pair`` as two peers on a loopback UDP path (``make`` is never called:
    the checks that call it are the relay-endpoint ones left out above)."""

    def __init__(self, path: type[UdpPath]) -> None:
        super().__init__(make=self._no_transport)
        self._path = path

    @staticmethod
    def _no_transport() -> Transport:
        raise AssertionError("peer sessions have no transport to make")

    @contextlib.asynccontextmanager
    async def pair(
        self, handler: Handler | None = None
    ) -> AsyncIterator[tuple[Session, asyncio.Queue[Session]]]:
        one, two = DeviceIdentity.create(), DeviceIdentity.create()
        client, server = PeerEnd(one, two), PeerEnd(two, one)
        if server.session.controlling:
            client, server = server, client
        accepted: asyncio.Queue[Session] = asyncio.Queue()
        server_path, client_path = await udp_paths(self._path)
        server.session.add_path(server_path)
        client.session.add_path(client_path)
        served = asyncio.ensure_future(handler(server)) if handler is not None else None
        try:
            await client.session.wait_connected(10)
            accepted.put_nowait(server)
            yield client, accepted
        finally:
            await client.aclose()
            await server.aclose()
            if served is not None:
                served.cancel()
                await asyncio.gather(served, return_exceptions=True)


@pytest.mark.parametrize("check", PEER_CHECKS, ids=lambda check: check.__name__)
def test_conformance(check: object) -> None:
    run_check(check, PeerSessionKit(BatchingUdpPath))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "check", [large_payload_integrity, slow_reader_bounds_memory], ids=lambda c: c.__name__
)
def test_conformance_on_a_path_whose_sends_wait(check: object) -> None:
    """DERP paths have neither ``send_batch`` nor ``deliver_to``: the session's sender task
    calls ``send``, its reader task ``receive``."""
    run_check(check, PeerSessionKit(UdpPath))  # type: ignore[arg-type]


class TcpPeerSessionKit(TransportKit):
    """The kit's ``pair`` as two peers on a loopback TCP path."""

    def __init__(self) -> None:
        super().__init__(make=self._no_transport)

    @staticmethod
    def _no_transport() -> Transport:
        raise AssertionError("peer sessions have no transport to make")

    @contextlib.asynccontextmanager
    async def pair(
        self, handler: Handler | None = None
    ) -> AsyncIterator[tuple[Session, asyncio.Queue[Session]]]:
        dialer, acceptor = DeviceIdentity.create(), DeviceIdentity.create()
        accepted_link: asyncio.Future[tcp.TcpLink] = asyncio.get_running_loop().create_future()
        listener = tcp.PeerTcpListener(
            acceptor,
            lambda: [peer_info(dialer)],
            lambda _peer, link: accepted_link.set_result(link),
            ["127.0.0.1"],
        )
        await listener.start("127.0.0.1")
        try:
            endpoints = tcp.parse_endpoints({"endpoints": listener.endpoints()})
            dialed = await tcp.dial(dialer, peer_info(acceptor), endpoints)
            client = PeerEnd(dialer, acceptor, dialed)
            server = PeerEnd(acceptor, dialer, await asyncio.wait_for(accepted_link, 10))
        finally:
            await listener.aclose()
        accepted: asyncio.Queue[Session] = asyncio.Queue()
        served = asyncio.ensure_future(handler(server)) if handler is not None else None
        try:
            accepted.put_nowait(server)
            yield client, accepted
        finally:
            await client.aclose()
            await server.aclose()
            if served is not None:
                served.cancel()
                await asyncio.gather(served, return_exceptions=True)


@pytest.mark.parametrize("check", PEER_CHECKS, ids=lambda check: check.__name__)
def test_conformance_on_a_tcp_path(check: object) -> None:
    run_check(check, TcpPeerSessionKit())  # type: ignore[arg-type]
