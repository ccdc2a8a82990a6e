"""Peers of a tenant on loopback, over DERP through an in-process relay: the QUIC session,
peer tunnels to exposed ports only, and nothing across tenants.

ICE is left out here on purpose (``relay-only``): aioice offers the machine's real
interfaces as candidates, and tests only touch loopback; tests/test_p2p_nat.py runs ICE
and TURN in network namespaces.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import P2PConnectionFailed, Unauthorized
from cloudbridge_core.p2p.forward import PeerTunnel
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.p2p.metrics import P2PMetrics
from cloudbridge_core.p2p.setup import PeerTunnelSpec
from cloudbridge_core.relay.mesh import Mesh
from cloudbridge_core.testing.streams import read_all
from cloudbridge_core.testing.waiting import until
from prometheus_client import CollectorRegistry
from relaybed import BOTH, Bed, echo_server, round_trip, run

pytestmark = pytest.mark.timeout(90)
MESH = [*BOTH, "p2p:mesh"]


@asynccontextmanager
async def member(
    bed: Bed, name: str, tenant: str = "acme", expose: tuple[int, ...] = ()
) -> AsyncIterator[PeerManager]:
    config = bed.client_config(
        bed.token(tenant=tenant, permissions=MESH),
        **{"p2p.name": name, "p2p.expose": list(expose), "p2p.heartbeat_interval": "1s"},
    )
    link = RelayLink(config, bed.plugins)
    await link.start()
    identity, metrics = DeviceIdentity.create(), P2PMetrics(CollectorRegistry())
    manager = PeerManager(config, bed.plugins, link, identity, set(expose), "relay-only", metrics)
    try:
        await manager.start()
        yield manager
    finally:
        await manager.aclose()
        await link.aclose()


def sample(manager: PeerManager, name: str, **labels: str) -> float:
    assert manager.metrics is not None
    value = manager.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def sha256_round_trip(mesh: PeerManager, peer: str, port: int, size: int) -> tuple[str, str]:
    payload = os.urandom(size)
    stream, early = await mesh.open(peer, port, 10)

    async def send() -> None:
        await stream.write(payload)
        await stream.close_write()

    sending = asyncio.create_task(send())
    received = early + await asyncio.wait_for(read_all(stream), 30)
    await sending
    await stream.aclose()
    return hashlib.sha256(payload).hexdigest(), hashlib.sha256(received).hexdigest()


async def tunnel_round_trip(mesh: PeerManager, peer: str, port: int, size: int) -> None:
    """A peer tunnel (the core's pump on both peers) carries ``size`` bytes to an echo
    service on ``peer``'s ``port`` and back, intact and without an error."""
    tunnel = PeerTunnel(PeerTunnelSpec(0, peer, port), mesh)
    await tunnel.start()
    try:
        payload = os.urandom(size)
        echoed = await round_trip(tunnel.port, payload)
    finally:
        await tunnel.aclose()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert tunnel.statistics.errors == 0


def test_peer_tunnel_over_derp_carries_data_and_reaches_only_exposed_ports(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        forwarded: list[bytes] = []
        forward = Mesh._forward

        async def recording(mesh: Mesh, sender: object, frame: object) -> None:
            forwarded.append(frame.payload)  # type: ignore[attr-defined]
            await forward(mesh, sender, frame)  # type: ignore[arg-type]

        Mesh._forward = recording  # type: ignore[method-assign]
        try:
            async with (
                echo_server() as echo_port,
                echo_server() as hidden_port,
                member(bed, "laptop") as laptop,
                member(bed, "server", expose=(echo_port,)) as server,
                member(bed, "outsider", tenant="globex") as outsider,
            ):
                await until(lambda: "server" in [p["name"] for p in laptop.status()])
                sent, received = await sha256_round_trip(laptop, "server", echo_port, 4 << 20)
                assert sent == received
                (status,) = laptop.status()
                assert status["path"] == "derp"
                assert status["endpoint"] == "relay"
                assert status["connected"]
                assert status["last_seen"] is not None
                ping = await laptop.ping("server", 5)
                assert ping["path"] == "derp"
                assert ping["rtt_seconds"] > 0
                await asyncio.sleep(1.2)  # the metrics follow each second
                assert sample(laptop, "cloudbridge_client_p2p_peers", path="derp") == 1
                assert sample(laptop, "cloudbridge_client_p2p_peers", path="stun") == 0
                assert sample(laptop, "cloudbridge_client_p2p_successes_total", strategy="derp")
                received = sample(
                    laptop, "cloudbridge_client_p2p_bytes_total", direction="received"
                )
                assert received > 4 << 20

                with pytest.raises(Unauthorized, match="not exposed"):
                    await laptop.open("server", hidden_port, 10)
                with pytest.raises(P2PConnectionFailed, match="no peer named 'server'"):
                    outsider.find("server")
                assert outsider.status() == []
                assert [p["name"] for p in server.status()] == ["laptop"]
        finally:
            Mesh._forward = forward  # type: ignore[method-assign]
        assert forwarded
        marker = b"cloudbridge-plaintext-marker"
        assert not any(marker in payload for payload in forwarded)

    run(tmp_path, scenario)
