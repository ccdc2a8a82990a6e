"""Each device tells its relay how it reaches its peers (``mesh_report``), and the relay
keeps the latest on the device's member, naming only peers of the device's tenant.

Peers on loopback over DERP through an in-process relay (``relay-only``, as in
tests/test_p2p_loopback.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.p2p import membership
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.protocol import messages
from cloudbridge_core.relay import server
from cloudbridge_core.relay.mesh import Member
from cloudbridge_core.testing.streams import read_all
from cloudbridge_core.testing.waiting import until
from relaybed import BOTH, Bed, echo_server, run

pytestmark = pytest.mark.timeout(90)
MESH = [*BOTH, "p2p:mesh"]


@asynccontextmanager
async def device(
    bed: Bed, name: str, tenant: str = "acme", expose: tuple[int, ...] = ()
) -> AsyncIterator[tuple[PeerManager, RelayLink]]:
    config = bed.client_config(
        bed.token(tenant=tenant, permissions=MESH),
        **{"p2p.name": name, "p2p.expose": list(expose), "p2p.heartbeat_interval": "1s"},
    )
    link = RelayLink(config, bed.plugins)
    await link.start()
    manager = PeerManager(
        config, bed.plugins, link, DeviceIdentity.create(), set(expose), "relay-only"
    )
    try:
        await manager.start()
        yield manager, link
    finally:
        await manager.aclose()
        await link.aclose()


async def echoed(manager: PeerManager, peer: str, port: int, payload: bytes) -> bytes:
    stream, early = await manager.open(peer, port, 10)
    await stream.write(payload)
    await stream.close_write()
    received = early + await read_all(stream)
    await stream.aclose()
    return received


def member_of(bed: Bed, tenant: str, manager: PeerManager) -> Member | None:
    return bed.relay.relay.mesh.member(tenant, manager.membership.peer_id)


def reported(member: Member | None, peer_id: str) -> dict[str, Any] | None:
    if member is None or member.report is None:
        return None
    return next((p for p in member.report["peers"] if p["peer_id"] == peer_id), None)


def test_each_device_reports_its_paths_and_counters_to_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # counters are reported every REPORT_INTERVAL, paths as soon as they change
    monkeypatch.setattr(membership, "REPORT_INTERVAL", 1.0)

    async def scenario(bed: Bed) -> None:
        async with (
            echo_server() as echo_port,
            device(bed, "laptop") as (laptop, _),
            device(bed, "server", expose=(echo_port,)) as (server, _),
        ):
            await until(lambda: [p["path"] for p in laptop.status()] == ["derp"])
            payload = bytes(256 << 10)
            assert await echoed(laptop, "server", echo_port, payload) == payload
            mesh = bed.relay.relay.mesh
            assert {m.info["name"] for m in mesh.members_of("acme")} == {"laptop", "server"}
            for this, other in ((laptop, server), (server, laptop)):

                def carried(this: PeerManager = this, other: PeerManager = other) -> bool:
                    peer = reported(member_of(bed, "acme", this), other.membership.peer_id)
                    return peer is not None and peer["bytes_received"] > 256 << 10

                await until(carried, within=15)
                holder = member_of(bed, "acme", this)
                assert holder is not None
                assert holder.reported_at is not None
                assert holder.report is not None
                peer = reported(holder, other.membership.peer_id)
                assert peer is not None
                assert (peer["name"], peer["path"]) == (other.membership.name, "derp")
                assert peer["bytes_sent"] > 0
                assert peer["last_seen"] is not None
                assert [p["peer_id"] for p in holder.report["peers"]] == [other.membership.peer_id]

    run(tmp_path, scenario)


def test_a_report_naming_another_tenants_device_is_kept_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # once the path is reported, the device reports nothing more while this test runs
    monkeypatch.setattr(membership, "REPORT_INTERVAL", 3600.0)

    async def scenario(bed: Bed) -> None:
        async with (
            device(bed, "laptop") as (laptop, link),
            device(bed, "server") as (server, _),
            device(bed, "outsider", tenant="globex") as (outsider, _),
        ):
            own, foreign = server.membership.peer_id, outsider.membership.peer_id

            def on_derp() -> bool:
                peer = reported(member_of(bed, "acme", laptop), own)
                return peer is not None and peer["path"] == "derp"

            await until(on_derp)
            entry: dict[str, Any] = {
                "name": "x",
                "path": "direct",
                "rtt_seconds": None,
                "last_seen": None,
                "bytes_sent": 1,
                "bytes_received": 2,
                "summary": "crafted",
                "attempts": [],
                "path_changes": [],
            }
            crafted = [{**entry, "peer_id": peer_id} for peer_id in (own, foreign)]
            await link.current.control.send(messages.MeshReport(crafted))
            holder = member_of(bed, "acme", laptop)
            assert holder is not None

            def taken() -> bool:
                report = holder.report or {"peers": []}
                return any(p["summary"] == "crafted" for p in report["peers"])

            await until(taken)
            assert holder.report is not None
            assert [p["peer_id"] for p in holder.report["peers"]] == [own]
            assert [m.info["name"] for m in bed.relay.relay.mesh.members_of("globex")] == [
                "outsider"
            ]

    run(tmp_path, scenario)


def test_a_relay_that_does_not_take_reports_gets_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older relay ends a session on a message it does not know: the client reports only
    to a relay whose welcome names ``mesh_report``."""
    monkeypatch.setattr(server, "TAKEN", frozenset())

    async def scenario(bed: Bed) -> None:
        async with device(bed, "laptop") as (laptop, link), device(bed, "server"):
            await until(lambda: [p["path"] for p in laptop.status()] == ["derp"])
            assert link.current.welcome.capabilities is None
            first = link.current
            await asyncio.sleep(2 * membership.REPORT_SETTLE + 0.5)
            holder = member_of(bed, "acme", laptop)
            assert holder is not None
            assert holder.report is None
            assert link.current is first  # and the session lives on

    run(tmp_path, scenario)
