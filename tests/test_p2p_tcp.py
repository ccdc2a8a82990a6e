"""The TCP+TLS direct path between peers (issue 15), on loopback through an in-process
relay: it carries peer streams when one peer can reach the other, even if only one can;
a certificate no known peer issued is refused; and a TCP connection killed mid-transfer
resets the application's connection, after which the next one works.

The peers publish 127.0.0.1 for their TCP listeners; their QUIC session goes over DERP
(``relay-only``: ICE would use the machine's real interfaces, and an ICE attempt cut short
at the end leaves aioice's sockets to the garbage collector), and carries streams
whenever the TCP path is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import P2PConnectionFailed
from cloudbridge_core.p2p import tcp
from cloudbridge_core.p2p.forward import PeerTunnel
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.p2p.setup import PeerTunnelSpec
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import PeerInfo
from cloudbridge_core.testing.waiting import until
from cloudbridge_core.tlsutil import generate_ca
from cloudbridge_core.transports.mux_session import MuxSession
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from relaybed import Bed, echo_server, run
from test_p2p_loopback import MESH, sha256_round_trip, tunnel_round_trip

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def member(
    bed: Bed,
    name: str,
    expose: tuple[int, ...] = (),
    identity: DeviceIdentity | None = None,
    tcp_path: bool = True,
) -> AsyncIterator[PeerManager]:
    """A peer whose TCP listener is published as 127.0.0.1 (``tcp_path=False``: a peer
    without a TCP path, which ignores ``tcp`` signals as older clients do). Without the
    relayed stream (tests/test_p2p_relayed.py): here QUIC over DERP is the fallback."""
    config = bed.client_config(
        bed.token(permissions=MESH),
        **{"p2p.name": name, "p2p.expose": list(expose), "p2p.heartbeat_interval": "1s"},
    )
    link = RelayLink(config, bed.plugins)
    await link.start()
    manager = PeerManager(
        config,
        bed.plugins,
        link,
        identity or DeviceIdentity.create(),
        set(expose),
        "relay-only",
        tcp_addresses=["127.0.0.1"],
        tcp=tcp_path,
        relayed=False,
    )
    try:
        await manager.start()
        yield manager
    finally:
        await manager.aclose()
        await link.aclose()


def protocol(manager: PeerManager) -> str | None:
    peers = manager.status()
    return peers[0]["protocol"] if peers else None


def identities() -> tuple[DeviceIdentity, DeviceIdentity]:
    """Two identities, the controlling one (lower peer id) first."""
    one, two = DeviceIdentity.create(), DeviceIdentity.create()
    return (one, two) if one.peer_id < two.peer_id else (two, one)


def test_a_peer_tunnel_takes_the_tcp_path_and_carries_data(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", expose=(echo_port,)) as laptop,
            member(bed, "server", expose=(echo_port,)) as server,
        ):
            await until(lambda: protocol(laptop) == "tcp" and protocol(server) == "tcp", 30)
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 8 << 20)
            assert sent == received
            (status,) = laptop.status()
            assert (status["path"], status["protocol"], status["connected"]) == (
                "direct",
                "tcp",
                True,
            )
            assert status["endpoint"].startswith("127.0.0.1:")
            assert status["bytes_received"] > 8 << 20  # the payload came back over TCP
            assert "over tcp" in laptop.explain("server")["summary"]
            await tunnel_round_trip(laptop, "server", echo_port, 4 << 20)  # a peer tunnel over it
            # the peer's side opens streams over the same connection
            sent, received = await sha256_round_trip(server, "laptop", echo_port, 1 << 20)
            assert sent == received

    run(tmp_path, scenario)


def test_a_peer_without_the_tcp_path_is_reached_over_quic(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        async with (
            echo_server() as echo_port,
            member(bed, "laptop") as laptop,
            member(bed, "server", expose=(echo_port,), tcp_path=False) as server,
        ):
            await until(lambda: protocol(laptop) == "quic" and protocol(server) == "quic", 30)
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == received
            assert laptop.status()[0]["protocol"] == "quic"  # still: no TCP path came up
            assert server.tcp_listener is None

    run(tmp_path, scenario)


@pytest.mark.parametrize("unreachable", ["controlling", "controlled"])
def test_only_one_reachable_peer_is_enough(tmp_path: Path, unreachable: str) -> None:
    """One peer's TCP listener is closed (its endpoint refuses): the other one's works."""

    async def scenario(bed: Bed) -> None:
        first, second = identities()
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", identity=first) as laptop,
            member(bed, "server", expose=(echo_port,), identity=second) as server,
        ):
            closed = laptop if unreachable == "controlling" else server
            listener = closed.tcp_listener
            assert listener is not None
            port = int(listener.endpoints()[0].rpartition(":")[2])
            # still published, refused when dialled
            listener.endpoints = lambda: [f"127.0.0.1:{port}"]  # type: ignore[method-assign]
            await tcp.PeerTcpListener.aclose(listener)
            await until(lambda: protocol(laptop) == "tcp" and protocol(server) == "tcp", 30)
            (status,) = closed.status()
            assert status["protocol"] == "tcp"
            refused = laptop.explain("server")["attempts"]
            assert any(a["strategy"] == "tcp" and a["state"] == "established" for a in refused)
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 4 << 20)
            assert sent == received

    run(tmp_path, scenario)


def test_a_peer_tunnel_to_a_port_not_exposed_resets_the_application(tmp_path: Path) -> None:
    """The tunnel does not wait for the peer's answer (the application's bytes follow the
    stream's header at once): a refusal still reaches the application as a reset, never a
    clean EOF, and counts as the tunnel's error."""

    async def scenario(bed: Bed) -> None:
        async with (
            echo_server() as echo_port,
            echo_server() as hidden_port,
            member(bed, "laptop") as laptop,
            member(bed, "server", expose=(echo_port,)) as server,
        ):
            await until(lambda: protocol(laptop) == "tcp" and protocol(server) == "tcp", 30)
            tunnel = PeerTunnel(PeerTunnelSpec(0, "server", hidden_port), laptop)
            await tunnel.start()
            application = socket.create_connection(("127.0.0.1", tunnel.port))
            try:
                application.sendall(b"sent before any answer")
                application.setblocking(False)
                with pytest.raises(ConnectionResetError):
                    await read_to_end(application)
                await until(lambda: tunnel.statistics.errors == 1)
            finally:
                application.close()
                await tunnel.aclose()
            await tunnel_round_trip(laptop, "server", echo_port, 1 << 20)

    run(tmp_path, scenario)


def test_a_certificate_from_no_known_peer_is_refused(tmp_path: Path) -> None:
    """Both directions: a listener refuses a dialer whose certificate no known peer's CA
    issued (even one naming a known peer), and a dialer refuses a listener that is not
    the peer whose CA it pins."""

    async def scenario(_bed: Bed) -> None:
        mine, known, stranger = (DeviceIdentity.create() for _ in "abc")
        verified: list[PeerInfo] = []
        listener = tcp.PeerTcpListener(
            mine, lambda: [info(known)], lambda peer, link: verified.append(peer), ["127.0.0.1"]
        )
        await listener.start("127.0.0.1")
        endpoint = tcp.parse_endpoints({"endpoints": listener.endpoints()})
        try:
            # a stranger (its certificate from no known peer's CA) is hung up on, during
            # the handshake or right after it (TLS 1.3 ends the client's side first)
            try:
                link = await tcp.dial(stranger, info(mine), endpoint)
            except P2PConnectionFailed:
                pass
            else:
                assert not await link.expect_chosen(5)
                await link.aclose()
            # a dialer pinning another peer's CA refuses this listener
            with pytest.raises(P2PConnectionFailed, match="no TCP endpoint"):
                await tcp.dial(known, info(stranger), endpoint)
            assert verified == []
            link = await tcp.dial(known, info(mine), endpoint)  # the real peer gets in
            await until(lambda: verified)
            assert verified[0].peer_id == known.peer_id
            await link.aclose()
        finally:
            await listener.aclose()
        # a CA named like the known peer's, published by someone else, does not vouch for it
        impostor = generate_ca(f"cloudbridge peer {known.peer_id}").certificate.decode()
        forged = PeerInfo(known.peer_id, "known", known.public_key, certificate=impostor)
        assert tcp.identify(_der(known), [forged]) is None
        assert tcp.identify(_der(known), [info(known)]) is not None

    run(tmp_path, scenario)


def test_peers_agree_on_the_multiplexer_limits_and_an_older_peer_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two peers of this version take /2 (1 MiB windows, 256 KiB frames); with a peer that
    offers only /1 (an older client, which always runs a relay session's limits) both take
    /1. Each way, 4 MiB then cross one stream: had this side kept /2's limits, its sends
    would overrun the older peer's 256 KiB window (a protocol violation that ends the
    session), and the older peer would wait for ever for an update /2 gives only after
    512 KiB."""

    async def scenario() -> None:
        mine, older = DeviceIdentity.create(), DeviceIdentity.create()
        verified: asyncio.Queue[tcp.TcpLink] = asyncio.Queue()
        listener = tcp.PeerTcpListener(
            mine, lambda: [info(older)], lambda _, link: verified.put_nowait(link), ["127.0.0.1"]
        )
        await listener.start("127.0.0.1")
        endpoint = tcp.parse_endpoints({"endpoints": listener.endpoints()})
        try:
            current = await tcp.dial(older, info(mine), endpoint)
            accepted = await asyncio.wait_for(verified.get(), 10)
            assert current.limits == accepted.limits == tcp.LIMITS[tcp.ALPN]
            assert accepted.limits.initial_window == 1 << 20
            current.abort()
            accepted.abort()

            def offering_v1(identity: DeviceIdentity, peer: PeerInfo) -> ssl.SSLContext:
                context = newest(identity, peer)
                context.set_alpn_protocols([tcp.ALPN_V1])
                return context

            newest = tcp.client_context
            monkeypatch.setattr(tcp, "client_context", offering_v1)
            dialed = await tcp.dial(older, info(mine), endpoint)
            accepted = await asyncio.wait_for(verified.get(), 10)
        finally:
            await listener.aclose()
        assert accepted.limits == tcp.LIMITS[tcp.ALPN_V1] == MuxLimits()
        old_end = MuxSession(dialed.pipe, is_dialer=True, limits=MuxLimits())
        new_end = MuxSession(accepted.pipe, is_dialer=False, limits=accepted.limits)
        try:
            payload = os.urandom(4 << 20)
            for sender, receiver in ((new_end, old_end), (old_end, new_end)):
                stream = await sender.open_stream()
                writing = asyncio.ensure_future(stream.write(payload))
                other = await asyncio.wait_for(receiver.accept_stream(), 10)
                received = bytearray()
                while len(received) < len(payload):
                    received += await asyncio.wait_for(other.read(1 << 20), 10)
                await writing
                assert received == payload
        finally:
            await old_end.aclose()
            await new_end.aclose()

    asyncio.run(scenario())


def info(identity: DeviceIdentity) -> PeerInfo:
    certificate = identity.ca.certificate.decode()
    return PeerInfo(identity.peer_id, "peer", identity.public_key, certificate=certificate)


def _der(identity: DeviceIdentity) -> bytes:
    certificate = x509.load_pem_x509_certificate(identity.server.certificate)
    return certificate.public_bytes(Encoding.DER)


async def _endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(os.urandom(1 << 16))
            await writer.drain()


async def read_to_end(sock: socket.socket) -> None:
    while await asyncio.get_running_loop().sock_recv(sock, 1 << 16):
        pass


def test_a_killed_tcp_connection_resets_the_application_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        source = await asyncio.start_server(_endless, "127.0.0.1", 0)
        source_port = source.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        async with (
            echo_server() as echo_port,
            member(bed, "laptop") as laptop,
            member(bed, "server", expose=(echo_port, source_port)) as server,
        ):
            await until(lambda: protocol(laptop) == "tcp" and protocol(server) == "tcp", 30)
            tunnel = PeerTunnel(PeerTunnelSpec(0, "server", source_port), laptop)
            await tunnel.start()
            application = socket.create_connection(("127.0.0.1", tunnel.port))
            application.setblocking(False)
            try:
                received = 0
                while received < 4 << 20:
                    received += len(await loop.sock_recv(application, 1 << 16))
                carried = laptop.find("server").session.carried_by("tcp")
                assert carried is not None
                carried[1].abort()  # the TCP connection dies mid-transfer (an RST)
                with pytest.raises(ConnectionResetError):
                    await read_to_end(application)
            finally:
                application.close()
                await tunnel.aclose()
                source.close()
            # over QUIC at once, or over a new TCP path
            sent, back = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == back
            await until(lambda: protocol(laptop) == "tcp", 30)
            sent, back = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == back
            changes = laptop.explain("server")["path_changes"]
            assert [c["protocol"] for c in changes if "protocol" in c][:3] == [
                "tcp",
                "quic",
                "tcp",
            ]

    run(tmp_path, scenario)
