"""The relay's side of the mesh: peer lists, signalling and DERP packets stay in a tenant."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import CloudBridgeError
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.protocol import derp, messages
from cloudbridge_core.providers import Stream
from cloudbridge_core.relay.mesh import join_proof
from cloudbridge_core.wire import MessageStream
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from relaybed import BOTH, Bed, run

pytestmark = pytest.mark.timeout(60)
MESH = [*BOTH, "p2p:mesh"]


@dataclass
class Peer:
    connection: RelayConnection
    private_key: X25519PrivateKey
    inbox: asyncio.Queue[messages.Message] = field(default_factory=asyncio.Queue)

    @property
    def key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def public_key(self) -> str:
        return base64.b64encode(self.key).decode()

    async def proven(self, request: messages.MeshJoin) -> messages.MeshJoin:
        """``request`` with the proof this peer's key gives for its session's challenge."""
        challenge = await self.connection.mesh_challenge(5)
        relay_key = X25519PublicKey.from_public_bytes(base64.b64decode(challenge.key))
        return replace(request, proof=join_proof(self.private_key.exchange(relay_key), request))

    async def send(self, message: messages.Message) -> None:
        await self.connection.control.send(message)

    async def next(self, kind: type[messages.Message]) -> messages.Message:
        message = await asyncio.wait_for(self.inbox.get(), 5)
        assert isinstance(message, kind), message
        return message

    async def join(self, name: str, instance: str = "") -> messages.MeshPeers:
        request = messages.MeshJoin(name, self.public_key, "-----BEGIN CERTIFICATE-----", instance)
        await self.send(await self.proven(request))
        listed = await self.next(messages.MeshPeers)
        assert isinstance(listed, messages.MeshPeers)
        return listed

    async def derp_channel(self) -> Stream:
        stream = await self.connection.session.open_stream()
        header = MessageStream(stream)
        await header.send(messages.Open(derp.TARGET))
        reply = await header.expect(messages.Accept, messages.Reject)
        assert isinstance(reply, messages.Accept), reply
        return stream


async def peer(bed: Bed, tenant: str, permissions: list[str] = MESH) -> Peer:
    connection = await bed.connect(bed.token(tenant=tenant, permissions=permissions))
    joined = Peer(connection, X25519PrivateKey.generate())
    connection.on_message = joined.inbox.put_nowait
    return joined


async def frames_of(stream: Stream) -> list[derp.Frame]:
    reader = derp.FrameReader()
    while not (frames := reader.feed(await asyncio.wait_for(stream.read(), 5))):
        pass
    return frames


def rejected(bed: Bed, reason: str) -> float:
    value = bed.relay.relay.metrics.registry.get_sample_value(
        "cloudbridge_relay_p2p_rejected_total", {"reason": reason}
    )
    return value or 0.0


def test_peers_see_only_their_tenant_and_signal_only_within_it(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        laptop, server, outsider = (
            await peer(bed, "acme"),
            await peer(bed, "acme"),
            await peer(bed, "globex"),
        )
        assert (await laptop.join("laptop")).peers == []
        listed = await server.join("server")
        assert [p["name"] for p in listed.peers] == ["laptop"]
        laptop_id, server_id = listed.peers[0]["peer_id"], listed.self["peer_id"]
        joined = await laptop.next(messages.MeshEvent)
        assert isinstance(joined, messages.MeshEvent)
        assert (joined.event, joined.peer["name"]) == ("joined", "server")
        assert (await outsider.join("outsider")).peers == []  # acme is invisible to globex

        await laptop.send(messages.Signal(server_id, "ice", {"ufrag": "u1"}))
        signal = await server.next(messages.Signal)
        assert signal == messages.Signal(laptop_id, "ice", {"ufrag": "u1"})

        await outsider.send(messages.Signal(server_id, "ice", {"ufrag": "evil"}))
        failed = await outsider.next(messages.SignalFailed)
        assert isinstance(failed, messages.SignalFailed)
        assert failed.code == "p2p_failed"
        assert rejected(bed, "unknown_peer") == 1
        assert server.inbox.empty()

        await server.connection.aclose()
        left = await laptop.next(messages.MeshEvent)
        assert isinstance(left, messages.MeshEvent)
        assert (left.event, left.peer["peer_id"]) == ("left", server_id)
        assert outsider.inbox.empty()
        for each in (laptop, outsider):
            await each.connection.aclose()

    run(tmp_path, scenario)


def test_a_token_without_p2p_mesh_cannot_join_nor_signal(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        plain = await peer(bed, "acme", permissions=BOTH)
        await plain.send(messages.MeshJoin("x", plain.public_key, "pem"))
        refused = await plain.next(messages.ErrorMessage)
        assert isinstance(refused, messages.ErrorMessage)
        assert refused.code == "unauthorized"
        await plain.send(messages.Signal("AAAAAAAAAAAAAAAA", "ice", {}))
        stream = await plain.connection.session.open_stream()
        header = MessageStream(stream)
        await header.send(messages.Open(derp.TARGET))
        assert isinstance(await header.expect(messages.Reject), messages.Reject)
        assert rejected(bed, "unauthorized") == 1
        assert rejected(bed, "not_joined") == 2  # the signal and the DERP channel
        assert await plain.connection.ping(5) > 0  # the session itself goes on
        await plain.connection.aclose()

    run(tmp_path, scenario)


def test_derp_packets_reach_a_peer_of_the_tenant_by_key_and_no_other(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        laptop, server, outsider = (
            await peer(bed, "acme"),
            await peer(bed, "acme"),
            await peer(bed, "globex"),
        )
        for each, name in ((laptop, "laptop"), (server, "server"), (outsider, "outsider")):
            await each.join(name)
        channels = [await each.derp_channel() for each in (laptop, server, outsider)]
        sealed = b"\x01" * 1200
        await channels[0].write(
            derp.encode(derp.Frame(derp.FrameType.SEND_PACKET, server.key, sealed))
        )
        assert await frames_of(channels[1]) == [
            derp.Frame(derp.FrameType.RECV_PACKET, laptop.key, sealed)
        ]
        await channels[2].write(
            derp.encode(derp.Frame(derp.FrameType.SEND_PACKET, server.key, b"x"))
        )
        assert await frames_of(channels[2]) == [derp.Frame(derp.FrameType.PEER_GONE, server.key)]
        assert rejected(bed, "unknown_peer") == 1
        registry = bed.relay.relay.metrics.registry
        assert registry.get_sample_value("cloudbridge_relay_derp_bytes_total") == len(sealed)
        assert registry.get_sample_value("cloudbridge_relay_mesh_peers") == 3

        await server.connection.aclose()
        assert await frames_of(channels[0]) == [derp.Frame(derp.FrameType.PEER_GONE, server.key)]
        await bed.relay.relay.drain()
        assert await frames_of(channels[0]) == [
            derp.Frame(derp.FrameType.RESTARTING, bytes(derp.KEY_SIZE))
        ]
        for each in (laptop, outsider):
            await each.connection.aclose()

    run(tmp_path, scenario, drain_timeout="100ms")


@pytest.mark.parametrize(
    ("instance_back", "announced"),
    [
        ("process-2", [("left", "process-1"), ("joined", "process-2")]),
        ("process-1", [("joined", "process-1")]),
    ],
    ids=["restarted", "reconnected"],
)
def test_a_device_back_with_a_new_session_is_announced_as_left_then_joined_if_restarted(
    tmp_path: Path, instance_back: str, announced: list[tuple[str, str]]
) -> None:
    """A new process (another ``instance``) is a new peer: the others drop what they held
    for the old one. The same process on a new relay session (a reconnection, as when its
    network changed) kept its peer sessions: told ``left``, a peer would drop its side."""

    async def scenario(bed: Bed) -> None:
        laptop, server = await peer(bed, "acme"), await peer(bed, "acme")
        await laptop.join("laptop", "laptop-process")
        await server.join("server", "process-1")
        assert isinstance(await laptop.next(messages.MeshEvent), messages.MeshEvent)
        back = await peer(bed, "acme")
        back.private_key = server.private_key  # the same device key, on a new session
        listed = await back.join("server", instance_back)
        assert [p["name"] for p in listed.peers] == ["laptop"]
        told = []
        for _ in announced:
            event = await laptop.next(messages.MeshEvent)
            assert isinstance(event, messages.MeshEvent)
            told.append((event.event, event.peer["instance"]))
        assert told == announced
        await server.connection.aclose()  # the old session ends: nothing more to announce
        await asyncio.sleep(0.2)
        assert laptop.inbox.empty()
        for each in (laptop, back):
            await each.connection.aclose()

    run(tmp_path, scenario)


def test_a_malformed_mesh_message_closes_that_session(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        sender = await peer(bed, "acme")
        body = b'{"type":"mesh_join","name":"x","public_key":"not a key","certificate":"c"}'
        await sender.connection.control.stream.write(messages.LENGTH.pack(len(body)) + body)
        started = asyncio.get_running_loop().time()
        with pytest.raises(CloudBridgeError):
            await sender.connection.ping(5)
        assert asyncio.get_running_loop().time() - started < 2  # closed, not just silent
        for _ in range(40):  # the relay frees the session right after closing it
            if not bed.relay.relay.sessions_by_tenant:
                break
            await asyncio.sleep(0.05)
        assert bed.relay.relay.sessions_by_tenant == {}
        await sender.connection.aclose()

    run(tmp_path, scenario)


def test_a_join_with_another_devices_key_and_no_proof_is_refused_and_replaces_nothing(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        laptop, server, intruder = [await peer(bed, "acme") for _ in range(3)]
        await laptop.join("laptop")
        listed = await server.join("server")
        laptop_id = listed.peers[0]["peer_id"]
        assert isinstance(await laptop.next(messages.MeshEvent), messages.MeshEvent)
        stolen = messages.MeshJoin("laptop", laptop.public_key, "-----BEGIN CERTIFICATE-----")
        # no proof; then a proof made with the intruder's own key for the laptop's public key
        forged = replace(await intruder.proven(stolen), public_key=laptop.public_key)
        for attempt in (stolen, forged):
            await intruder.send(attempt)
            refused = await intruder.next(messages.ErrorMessage)
            assert isinstance(refused, messages.ErrorMessage)
            assert refused.code == "unauthorized"
        assert rejected(bed, "bad_proof") == 2
        await server.send(messages.Signal(laptop_id, "ice", {"ufrag": "u1"}))
        assert isinstance(await laptop.next(messages.Signal), messages.Signal)  # still the laptop
        await server.send(messages.MeshRefresh())
        peers = await server.next(messages.MeshPeers)
        assert isinstance(peers, messages.MeshPeers)
        assert [p["name"] for p in peers.peers] == ["laptop"]
        assert laptop.inbox.empty()  # neither left nor replaced
        assert await intruder.connection.ping(5) > 0  # only the mesh is refused
        for each in (laptop, server, intruder):
            await each.connection.aclose()

    run(tmp_path, scenario)


def test_a_key_bound_to_another_device_of_the_tenant_is_refused(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        laptop, copy = await peer(bed, "acme"), await peer(bed, "acme")
        await laptop.join("laptop")
        copy.private_key = laptop.private_key  # the key file copied to another machine
        request = messages.MeshJoin("desktop", copy.public_key, "-----BEGIN CERTIFICATE-----")
        await copy.send(await copy.proven(request))
        refused = await copy.next(messages.ErrorMessage)
        assert isinstance(refused, messages.ErrorMessage)
        assert refused.code == "unauthorized"
        assert "another device" in refused.message
        assert rejected(bed, "key_in_use") == 1
        assert laptop.inbox.empty()
        for each in (laptop, copy):
            await each.connection.aclose()

    run(tmp_path, scenario)


def test_a_device_replaced_by_a_newer_session_of_itself_is_told_why(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        first, second = await peer(bed, "acme"), await peer(bed, "acme")
        await first.join("server")
        second.private_key = first.private_key
        await second.join("server")
        told = await first.next(messages.MeshEvent)
        assert isinstance(told, messages.MeshEvent)
        assert told.event == "replaced"
        assert told.peer["public_key"] == first.public_key
        assert "newer session" in told.reason
        for each in (first, second):
            await each.connection.aclose()

    run(tmp_path, scenario)


def test_a_client_replaced_by_another_process_with_its_key_is_told_why(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        key_file = tmp_path / "device.key"
        links, members = [], []
        for _ in range(2):  # two processes started with one device key file
            link = RelayLink(bed.client_config(bed.token(permissions=MESH)), bed.plugins)
            await link.start()
            member = Membership(
                link, DeviceIdentity.create(key_file), "server", lambda _: None, _ignore_signal
            )
            await member.start(5)
            links.append(link)
            members.append(member)
        first, second = members
        for _ in range(100):  # the relay tells the first one right after the second joined
            if first.replaced is not None:
                break
            await asyncio.sleep(0.02)
        assert first.replaced is not None
        assert "newer session" in first.replaced
        assert second.replaced is None
        for member, link in zip(members, links, strict=True):
            await member.aclose()
            await link.aclose()

    run(tmp_path, scenario)


def _ignore_signal(peer_id: str, kind: str, body: object) -> None:
    del peer_id, kind, body
