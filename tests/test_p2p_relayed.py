"""Peer streams through the relay as one byte stream (issue 15, "over DERP"), on loopback
through an in-process relay: two peers in ``relay-only`` mode carry their streams on the
TCP path's mutual TLS and multiplexer over a ``peer_splice`` the relay joins, in place of
QUIC over DERP packets; the conformance kit passes on it; a peer of another tenant is
never spliced; a splice broken mid-transfer resets the application's connection; a peer
or a relay without ``peer_splice`` leaves the peers on QUIC over DERP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import types
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import TargetUnreachable, TransportClosed
from cloudbridge_core.p2p import relayed
from cloudbridge_core.p2p.channel import AttemptChannel
from cloudbridge_core.p2p.forward import PeerTunnel
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.p2p.session import PeerSession
from cloudbridge_core.p2p.setup import PeerTunnelSpec
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import PeerInfo, Session, Stream, Transport
from cloudbridge_core.relay import server as relay_server
from cloudbridge_core.testing.conformance import (
    CHECKS,
    Handler,
    TransportKit,
    connect_timeout,
    oversized_frame_rejected,
    preauth_budget_held,
    run_check,
    untrusted_certificate_rejected,
)
from cloudbridge_core.testing.waiting import until
from relaybed import Bed, echo_server, relay_bed, run
from test_p2p_loopback import MESH, sha256_round_trip, tunnel_round_trip
from test_p2p_tcp import identities, read_to_end

pytestmark = pytest.mark.timeout(90)

RELAYED = relayed.KIND


@asynccontextmanager
async def member(
    bed: Bed,
    name: str,
    tenant: str = "acme",
    expose: tuple[int, ...] = (),
    relayed_stream: bool = True,
    links: list[RelayLink] | None = None,
    identity: DeviceIdentity | None = None,
) -> AsyncIterator[PeerManager]:
    """A peer in ``relay-only`` mode (``relayed_stream=False``: one that ignores the
    ``relay-stream`` signal, as older clients do); its relay link goes to ``links``."""
    config = bed.client_config(
        bed.token(tenant=tenant, permissions=MESH),
        **{"p2p.name": name, "p2p.expose": list(expose), "p2p.heartbeat_interval": "1s"},
    )
    link = RelayLink(config, bed.plugins)
    await link.start()
    if links is not None:
        links.append(link)
    manager = PeerManager(
        config,
        bed.plugins,
        link,
        identity or DeviceIdentity.create(),
        set(expose),
        "relay-only",
        relayed=relayed_stream,
    )
    try:
        await manager.start()
        yield manager
    finally:
        await manager.aclose()
        await link.aclose()


def no_tickets(bed: Bed) -> None:
    """The relay offers no tickets, as one without a TLS listener: peers splice streams."""
    bed.relay.relay.tickets.port = None


def carrier(manager: PeerManager) -> tuple[str, str] | None:
    peers = manager.status()
    return (peers[0]["path"], peers[0]["protocol"]) if peers else None


def sample(bed: Bed, name: str, **labels: str) -> float:
    registry = bed.relay.relay.metrics.registry
    return registry.get_sample_value(name, labels) or 0.0


def test_a_peer_tunnel_in_relay_only_mode_takes_the_relayed_stream(tmp_path: Path) -> None:
    """A relay that offers no tickets (no TLS listener to take raw connections): the peers
    fall back from ``relay-tcp`` to a splice of relay streams."""

    async def scenario(bed: Bed) -> None:
        no_tickets(bed)
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", expose=(echo_port,)) as laptop,
            member(bed, "server", expose=(echo_port,)) as server,
        ):
            on_stream = ("derp", RELAYED)
            await until(lambda: carrier(laptop) == on_stream == carrier(server), 30)
            spliced = sample(bed, "cloudbridge_relay_derp_bytes_total")
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 8 << 20)
            assert sent == received
            (status,) = laptop.status()
            assert (status["path"], status["protocol"], status["endpoint"]) == (
                "derp",
                RELAYED,
                "relay",
            )
            assert status["bytes_received"] > 8 << 20  # the payload came back on the stream
            assert "on derp" in laptop.explain("server")["summary"]
            await tunnel_round_trip(laptop, "server", echo_port, 4 << 20)  # a peer tunnel over it
            # the peer's side opens streams over the same stream
            sent, received = await sha256_round_trip(server, "laptop", echo_port, 1 << 20)
            assert sent == received
        # the relay spliced the bytes (it counts them when the splice ends)
        assert sample(bed, "cloudbridge_relay_derp_bytes_total") - spliced > 2 * (13 << 20)

    run(tmp_path, scenario)


def test_a_peer_of_another_tenant_is_refused_and_nothing_is_spliced(tmp_path: Path) -> None:
    """Both ask for each other with the same attempt: each is refused at once as asking
    for an unknown peer, and nothing waits or is spliced."""

    async def scenario(bed: Bed) -> None:
        async with member(bed, "laptop") as laptop, member(bed, "rival", tenant="other") as rival:
            before = sample(bed, "cloudbridge_relay_p2p_rejected_total", reason="unknown_peer")
            for one, other in ((laptop, rival), (rival, laptop)):
                with pytest.raises(TargetUnreachable, match="no such peer"):
                    await one.membership.open_splice(other.membership.peer_id, 7)
            after = sample(bed, "cloudbridge_relay_p2p_rejected_total", reason="unknown_peer")
            assert after - before == 2
            assert bed.relay.relay.splicer.waiting == 0
            assert bed.relay.relay.streams_active == 0
            assert laptop.status() == []  # neither sees the other
            assert rival.status() == []

    run(tmp_path, scenario)


async def _endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(os.urandom(1 << 16))
            await writer.drain()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_broken_splice_resets_the_application_and_everything_is_freed(tmp_path: Path) -> None:
    """The far peer's relay session is lost mid-download: the relay resets the near peer's
    side of the splice, and the application sees a reset, never a clean EOF. Descriptors
    and tasks return to their baseline once the peers are gone."""

    async def scenario(bed: Bed) -> None:
        no_tickets(bed)
        source = await asyncio.start_server(_endless, "127.0.0.1", 0)
        source_port = source.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        descriptors, tasks = _descriptors(), len(asyncio.all_tasks())
        far_link: list[RelayLink] = []
        async with (
            member(bed, "laptop") as laptop,
            member(bed, "server", expose=(source_port,), links=far_link) as server,
        ):
            on_stream = ("derp", RELAYED)
            await until(lambda: carrier(laptop) == on_stream == carrier(server), 30)
            tunnel = PeerTunnel(PeerTunnelSpec(0, "server", source_port), laptop)
            await tunnel.start()
            application = socket.create_connection(("127.0.0.1", tunnel.port))
            application.setblocking(False)
            try:
                received = 0
                while received < 4 << 20:
                    received += len(await loop.sock_recv(application, 1 << 16))
                # the far peer's relay session ends (as when its connection is lost)
                await far_link[0].current.session.aclose()
                with pytest.raises(ConnectionResetError):
                    await read_to_end(application)
            finally:
                application.close()
                await tunnel.aclose()
        source.close()
        await source.wait_closed()
        await until(lambda: _descriptors() <= descriptors and len(asyncio.all_tasks()) <= tasks, 15)

    run(tmp_path, scenario)


def relayed_attempt(manager: PeerManager, peer: str) -> dict[str, Any]:
    """The last relay-stream attempt towards ``peer`` (empty before the first)."""
    found = [a for a in manager.explain(peer)["attempts"] if a["strategy"] == RELAYED]
    return found[0] if found else {}


def test_a_peer_without_the_relayed_stream_is_reached_over_quic_over_derp(
    tmp_path: Path,
) -> None:
    """The other peer never opens its side: the relay refuses the waiting one after its
    handshake_timeout, and QUIC over DERP carries the streams."""

    async def scenario(bed: Bed) -> None:
        controlling, controlled = identities()  # the laptop makes the attempts
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", identity=controlling) as laptop,
            member(
                bed, "server", expose=(echo_port,), relayed_stream=False, identity=controlled
            ) as server,
        ):
            await until(lambda: carrier(laptop) == ("derp", "quic") == carrier(server), 30)
            await until(lambda: relayed_attempt(laptop, "server").get("state") == "failed", 30)
            assert "did not come" in relayed_attempt(laptop, "server")["error"]
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == received
            assert carrier(laptop) == ("derp", "quic")
            timeouts = sample(bed, "cloudbridge_relay_p2p_rejected_total", reason="timeout")
            assert timeouts >= 1

    run(tmp_path, scenario, handshake_timeout="2s")


def test_a_peer_back_on_a_new_relay_session_keeps_its_peer_session(tmp_path: Path) -> None:
    """Roaming (issue 16) cuts a device's relay session: the relay may see it end, and tell
    the others ``left``, before the same process joins again on a new one. Its peers keep
    their peer session with it, as it keeps its own: dropped on ``left``, the device's
    streams on it would fail (they were, before: the server made a new session at once)."""

    async def scenario(bed: Bed) -> None:
        controlling, controlled = identities()
        links: list[RelayLink] = []
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", identity=controlling, links=links) as laptop,
            member(
                bed, "server", expose=(echo_port,), relayed_stream=False, identity=controlled
            ) as server,
        ):
            await until(lambda: carrier(laptop) == ("derp", "quic") == carrier(server), 30)
            held = server.peers[controlling.peer_id]
            cut = links[0].current
            await cut.aclose()  # the relay sees it end before the laptop is back
            await until(lambda: links[0].current is not cut, 30)
            await until(lambda: controlling.peer_id in server.membership.peers, 30)
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == received
            assert server.peers[controlling.peer_id] is held

    run(tmp_path, scenario, handshake_timeout="2s")


def test_a_relay_without_peer_splice_leaves_the_peers_on_quic_over_derp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older relay reads only ``open`` at the start of a stream: it drops the stream
    (here the relay's message module has no ``peer_ticket`` nor ``peer_splice`` to
    expect), so the peers get no ticket, the relay stream they fall back to fails
    at once, and QUIC over DERP carries the streams."""
    unknown = type("Unknown", (), {})  # a kind no message decodes to
    older = types.SimpleNamespace(
        **{**vars(messages), "PeerSplice": unknown, "PeerTicket": unknown}
    )
    monkeypatch.setattr(relay_server, "messages", older)

    async def scenario(bed: Bed) -> None:
        controlling, controlled = identities()  # the laptop makes the attempts
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", identity=controlling) as laptop,
            member(bed, "server", expose=(echo_port,), identity=controlled) as server,
        ):
            await until(lambda: carrier(laptop) == ("derp", "quic") == carrier(server), 30)
            await until(lambda: relayed_attempt(laptop, "server").get("state") == "failed", 30)
            assert "no relayed stream" in relayed_attempt(laptop, "server")["error"]
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == received
            assert bed.relay.relay.splicer.waiting == 0

    run(tmp_path, scenario)


# ---- the conformance kit on two peer sessions over a relayed stream ----

RELAY_ENDPOINT_CHECKS = {
    connect_timeout,
    untrusted_certificate_rejected,
    oversized_frame_rejected,
    preauth_budget_held,
}
PEER_CHECKS = [check for check in CHECKS if check not in RELAY_ENDPOINT_CHECKS]


class RelayedPeerEnd:
    """One peer's :class:`PeerSession` on a relayed link, seen as a :class:`Session`."""

    def __init__(self, identity: DeviceIdentity, other: PeerInfo, link: relayed.RelayedLink):
        self._incoming: asyncio.Queue[Stream] = asyncio.Queue()
        self.session = PeerSession(identity, other, link.dialed, self._serve)
        self.session.attach(RELAYED, link)
        assert self.session.protocol == link.protocol

    async def _serve(self, stream: Stream) -> None:
        self._incoming.put_nowait(stream)

    async def open_stream(self) -> Stream:
        return await self.session.open_stream()

    async def accept_stream(self) -> Stream:
        carried = self.session.carried_by(RELAYED)  # its end ends accepting, as on a relay
        if carried is None:
            raise TransportClosed("the relayed link has ended")
        incoming = asyncio.ensure_future(self._incoming.get())
        ended = asyncio.ensure_future(carried[0].wait_closed())
        await asyncio.wait({incoming, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if incoming.done():
            return incoming.result()
        incoming.cancel()
        raise TransportClosed("the relayed link has ended")

    def authenticated(self) -> None:
        """Peers are authenticated before their session starts."""

    async def aclose(self) -> None:
        await self.session.aclose()


class RelayedPeerSessionKit(TransportKit):
    """The kit's ``pair`` as two peers joined by an in-process relay (each a mesh member of
    one tenant; no QUIC session runs, so every stream takes the relayed link): on
    ``carrier`` ``relay-stream`` the relay offers no tickets, so the peers take a splice of
    relay streams; on ``relay-tcp`` their raw connections to its TLS port."""

    def __init__(self, carrier: str = RELAYED) -> None:
        super().__init__(make=self._no_transport)
        self._carrier = carrier

    @staticmethod
    def _no_transport() -> Transport:
        raise AssertionError("peer sessions have no transport to make")

    @contextlib.asynccontextmanager
    async def pair(
        self, handler: Handler | None = None
    ) -> AsyncIterator[tuple[Session, asyncio.Queue[Session]]]:
        with tempfile.TemporaryDirectory(prefix="relayed-kit-") as directory:
            async with relay_bed(Path(directory)) as bed, contextlib.AsyncExitStack() as stack:
                if self._carrier == RELAYED:
                    no_tickets(bed)
                channels: dict[str, AttemptChannel] = {}
                ends = [
                    await stack.enter_async_context(_joined(bed, n, channels)) for n in ("a", "b")
                ]
                await until(lambda: all(m.peers for m, _ in ends), 10)
                (one, one_identity), (two, two_identity) = ends
                one_sees, two_sees = one.peers[two.peer_id], two.peers[one.peer_id]
                controls = one.peer_id < two.peer_id
                for membership, identity, sees, controlling in (
                    (one, one_identity, one_sees, controls),
                    (two, two_identity, two_sees, not controls),
                ):
                    channels[membership.peer_id] = AttemptChannel(
                        membership, identity, sees, RELAYED, 1, controlling
                    )
                links = await asyncio.gather(
                    relayed.RelayedConnector(one, one_identity).connect(
                        one_sees, channels[one.peer_id], controls
                    ),
                    relayed.RelayedConnector(two, two_identity).connect(
                        two_sees, channels[two.peer_id], not controls
                    ),
                )
                assert [link.protocol for link in links] == [self._carrier] * 2
                first = RelayedPeerEnd(one_identity, one_sees, links[0])
                second = RelayedPeerEnd(two_identity, two_sees, links[1])
                client, server = (first, second) if links[0].dialed else (second, first)
                accepted: asyncio.Queue[Session] = asyncio.Queue()
                accepted.put_nowait(server)
                served = asyncio.ensure_future(handler(server)) if handler is not None else None
                try:
                    yield client, accepted
                finally:
                    await client.aclose()
                    await server.aclose()
                    if served is not None:
                        served.cancel()
                        await asyncio.gather(served, return_exceptions=True)


@asynccontextmanager
async def _joined(
    bed: Bed, name: str, channels: dict[str, AttemptChannel]
) -> AsyncIterator[tuple[Membership, DeviceIdentity]]:
    """A mesh member whose signals go to its attempt's channel (``channels[peer_id]``)."""
    config = bed.client_config(bed.token(permissions=MESH), **{"p2p.name": name})
    link = RelayLink(config, bed.plugins)
    await link.start()
    identity = DeviceIdentity.create()

    def signalled(_peer_id: str, _kind: str, body: Mapping[str, Any]) -> None:
        channels[identity.peer_id].inbox.put_nowait(body["data"])

    membership = Membership(link, identity, name, lambda _peers: None, signalled)
    try:
        await membership.start(10)
        yield membership, identity
    finally:
        await membership.aclose()
        await link.aclose()


@pytest.mark.parametrize("check", PEER_CHECKS, ids=lambda check: check.__name__)
def test_conformance_over_the_relayed_stream(check: object) -> None:
    run_check(check, RelayedPeerSessionKit())  # type: ignore[arg-type]
