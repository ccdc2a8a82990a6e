"""Overlay addresses through a real relay: clients joining the mesh with an overlay key get
an address from their tenant's pool, see each other's, keep theirs across client and relay
restarts; tenants lease independently; ``cloudbridge relay ipam list`` shows the leases."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_process import BIN, environment
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.protocol import messages
from cloudbridge_core.testing.waiting import until
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from relaybed import BOTH, Bed, relay_bed

pytestmark = pytest.mark.timeout(60)
MESH = [*BOTH, "p2p:mesh"]


def wireguard_key() -> str:
    """A WireGuard public key as ``wg pubkey`` writes it (the relay never sees the private)."""
    return base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()


@asynccontextmanager
async def device(
    bed: Bed, tmp_path: Path, name: str, tenant: str = "acme", overlay_key: str = ""
) -> AsyncIterator[Membership]:
    """A client process of ``tenant`` in the mesh as ``name``; its device key is kept in a
    file, so the same name is the same device again after a restart."""
    link = RelayLink(bed.client_config(bed.token(tenant=tenant, permissions=MESH)), bed.plugins)
    await link.start()
    identity = DeviceIdentity.create(tmp_path / f"{tenant}-{name}.key")
    member = Membership(link, identity, name, _ignore, _ignore_signal, overlay_key=overlay_key)
    try:
        await member.start(5)
        yield member
    finally:
        await member.aclose()
        await link.aclose()


def _ignore(peers: object) -> None:
    del peers


def _ignore_signal(peer_id: str, kind: str, body: object) -> None:
    del peer_id, kind, body


async def ipam_list(state: Path, tenant: str) -> list[dict[str, Any]]:
    """``cloudbridge relay ipam list --json`` as a user runs it, next to a running relay."""
    process = await asyncio.create_subprocess_exec(
        *(BIN / "cloudbridge", "relay", "ipam", "list", "--state-dir", str(state)),
        *("--tenant", tenant, "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(),
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    leases: list[dict[str, Any]] = json.loads(out)["leases"]
    return leases


def test_devices_get_sticky_addresses_per_tenant_across_client_and_relay_restarts(
    tmp_path: Path,
) -> None:
    keys = {name: wireguard_key() for name in ("laptop", "server", "other")}

    async def main() -> None:
        async with relay_bed(tmp_path) as bed:
            async with (
                device(bed, tmp_path, "laptop", overlay_key=keys["laptop"]) as laptop,
                device(bed, tmp_path, "server", overlay_key=keys["server"]) as server,
            ):
                assert laptop.overlay == {"address": "100.64.0.1", "pool": "100.64.0.0/10"}
                assert server.overlay == {"address": "100.64.0.2", "pool": "100.64.0.0/10"}
                (seen_by_server,) = server.peers.values()
                assert (seen_by_server.overlay_ip, seen_by_server.overlay_key) == (
                    "100.64.0.1",
                    keys["laptop"],
                )
                await until(lambda: len(laptop.peers) == 1)  # told by mesh_event joined
                (seen_by_laptop,) = laptop.peers.values()
                assert (seen_by_laptop.overlay_ip, seen_by_laptop.overlay_key) == (
                    "100.64.0.2",
                    keys["server"],
                )
                # tenant B, same (default) pool: its own namespace
                async with device(
                    bed, tmp_path, "other", tenant="globex", overlay_key=keys["other"]
                ) as other:
                    assert other.overlay["address"] == "100.64.0.1"
                    assert other.peers == {}
                # a device asking for no address gets none, and is listed without one
                async with device(bed, tmp_path, "printer") as printer:
                    assert printer.overlay == {}
                    assert {p.name: p.overlay_ip for p in printer.peers.values()} == {
                        "laptop": "100.64.0.1",
                        "server": "100.64.0.2",
                    }
                    await until(lambda: len(laptop.peers) == 2)
                    assert laptop.peers[printer.peer_id].overlay_ip == ""
            # the laptop's client restarts, with a new WireGuard key: same device, same address
            keys["laptop"] = wireguard_key()
            async with device(bed, tmp_path, "laptop", overlay_key=keys["laptop"]) as laptop:
                assert laptop.overlay["address"] == "100.64.0.1"
            listed = await ipam_list(bed.state_dir, "acme")
            assert [(r["device"], r["address"]) for r in listed] == [
                ("laptop", "100.64.0.1"),
                ("server", "100.64.0.2"),
            ]
            assert [r["address"] for r in await ipam_list(bed.state_dir, "globex")] == [
                "100.64.0.1"
            ]
        # the relay restarts on the same state directory: the leases are still there
        async with relay_bed(tmp_path) as bed:
            async with (
                device(bed, tmp_path, "server", overlay_key=keys["server"]) as server,
                device(bed, tmp_path, "newcomer", overlay_key=wireguard_key()) as newcomer,
                device(bed, tmp_path, "laptop", overlay_key=keys["laptop"]) as laptop,
            ):
                assert server.overlay["address"] == "100.64.0.2"
                assert newcomer.overlay["address"] == "100.64.0.3"
                assert laptop.overlay["address"] == "100.64.0.1"
                assert {p.name: p.overlay_ip for p in laptop.peers.values()} == {
                    "server": "100.64.0.2",
                    "newcomer": "100.64.0.3",
                }
            async with device(
                bed, tmp_path, "other", tenant="globex", overlay_key=keys["other"]
            ) as other:
                assert other.overlay["address"] == "100.64.0.1"
            assert len(await ipam_list(bed.state_dir, "acme")) == 3

    asyncio.run(main())


def test_a_device_the_pool_has_no_room_for_is_told_why_and_stays_in_the_mesh(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        tenants = {"tiny": {"pool": "10.9.0.0/32"}}
        async with (
            relay_bed(tmp_path, overlay={"tenants": tenants}) as bed,
            device(bed, tmp_path, "first", "tiny", wireguard_key()) as first,
        ):
            assert first.overlay == {"address": "10.9.0.0", "pool": "10.9.0.0/32"}
            async with device(bed, tmp_path, "second", "tiny", wireguard_key()) as second:
                assert "10.9.0.0/32 is exhausted" in second.overlay["error"]
                assert "server.overlay.tenants.tiny.pool" in second.overlay["error"]
                assert list(second.peers) == [first.peer_id]  # in the mesh all the same
                second.overlay = {}
                await second.refresh()  # the peer list answering a refresh says so again
                await until(lambda: second.overlay != {})
                assert "is exhausted" in second.overlay["error"]

    asyncio.run(main())


def test_a_malformed_overlay_key_refuses_the_join_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with relay_bed(tmp_path) as bed:
            connection = await bed.connect(bed.token(permissions=MESH))
            inbox: asyncio.Queue[messages.Message] = asyncio.Queue()
            connection.on_message = inbox.put_nowait
            identity = DeviceIdentity.create(tmp_path / "device.key")
            request = messages.MeshJoin(
                "laptop", identity.public_key, "pem", overlay_key="bm90IGEga2V5"
            )
            challenge = await connection.mesh_challenge(5)
            await connection.control.send(identity.prove_join(challenge, request))
            refused = await asyncio.wait_for(inbox.get(), 5)
            assert isinstance(refused, messages.ErrorMessage), refused
            assert refused.code == "protocol_error"
            assert "overlay_key" in refused.message
            rejected = bed.relay.relay.metrics.registry.get_sample_value(
                "cloudbridge_relay_p2p_rejected_total", {"reason": "bad_overlay_key"}
            )
            assert rejected == 1
            assert await connection.ping(5) > 0
            assert not (bed.state_dir / "ipam.json").exists()  # nothing was leased
            await connection.aclose()

    asyncio.run(main())
