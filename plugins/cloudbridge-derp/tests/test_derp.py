"""The DERP strategy against a real relay on loopback: two peers of a tenant trade sealed
packets over their DERP channels; the relay carries only ciphertext."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.race import connect
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import P2PConnectionFailed
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.protocol import derp, messages
from cloudbridge_core.providers import PeerInfo, Stream
from cloudbridge_core.relay.mesh import Mesh
from cloudbridge_core.relay.runner import start_relay
from cloudbridge_core.relay.tokens import issue_token
from cloudbridge_core.wire import MessageStream
from cloudbridge_derp.strategy import DerpStrategy

pytestmark = pytest.mark.timeout(60)


class Channel:
    """What the strategy gets from the client: its relay session, and sealing for one peer."""

    def __init__(self, session: Any, identity: DeviceIdentity, peer: DeviceIdentity) -> None:
        self._session = session
        self._identity = identity
        self._peer_key = peer.public_key_bytes
        self.controlling = identity.peer_id < peer.peer_id

    @property
    def local_key(self) -> bytes:
        return self._identity.public_key_bytes

    async def send(self, message: Mapping[str, Any]) -> None:
        raise AssertionError("DERP needs no signalling")

    async def receive(self) -> Mapping[str, Any]:
        raise AssertionError("DERP needs no signalling")

    def seal(self, packet: bytes) -> bytes:
        return self._identity.seal(self._peer_key, packet)

    def open(self, sealed: bytes) -> bytes:
        return self._identity.open(self._peer_key, sealed)

    async def open_relay_stream(self, target: str) -> Stream:
        stream = await self._session.open_stream()
        header = MessageStream(stream)
        await header.send(messages.Open(target))
        assert isinstance(await header.expect(messages.Accept), messages.Accept)
        return stream


def info(identity: DeviceIdentity, name: str) -> PeerInfo:
    return PeerInfo(identity.peer_id, name, identity.public_key)


def test_sealed_packets_both_ways_through_the_relay(tmp_path: Path) -> None:
    async def main() -> None:
        plugins = load_plugins()
        schema = merged_schema(plugins.config_sections())
        overrides = {
            "server.state_dir": (str(tmp_path / "state"), "test"),
            "server.listen": ("127.0.0.1", "test"),
        }
        relay_config = load_config(None, environ={}, overrides=overrides, schema=schema)
        running = await start_relay(relay_config, plugins, dev=True, port_override=0)
        seen: list[bytes] = []
        forward = Mesh._forward

        async def recording(mesh: Mesh, sender: Any, frame: derp.Frame) -> None:
            seen.append(frame.payload)
            await forward(mesh, sender, frame)

        Mesh._forward = recording  # type: ignore[method-assign]
        identities = [DeviceIdentity.create(), DeviceIdentity.create()]
        sessions = []
        try:
            for identity, name in zip(identities, ("a", "b"), strict=True):
                token = issue_token(
                    running.state.signing_key,
                    issuer=running.state.issuer,
                    tenant="acme",
                    subject=name,
                    permissions=["relay:connect", "p2p:mesh"],
                    ttl=600,
                )
                config = load_config(
                    None,
                    environ={},
                    overrides={
                        "relay.host": ("127.0.0.1", "test"),
                        "transport.tls.port": (running.listeners["tls"].port, "test"),
                        "relay.tls.ca_file": (str(tmp_path / "state" / "ca.pem"), "test"),
                        "auth.token": (token, "test"),
                        "transport.mode": ("tls", "test"),
                    },
                    schema=schema,
                )
                connection = await connect(config, plugins)
                joined: asyncio.Queue[messages.Message] = asyncio.Queue()
                connection.on_message = joined.put_nowait
                request = messages.MeshJoin(name, identity.public_key, "pem")
                challenge = await connection.mesh_challenge(5)
                await connection.control.send(identity.prove_join(challenge, request))
                assert isinstance(await joined.get(), messages.MeshPeers)
                sessions.append(connection)
            a, b = identities
            to_b = await DerpStrategy().connect(info(b, "b"), Channel(sessions[0].session, a, b))
            to_a = await DerpStrategy().connect(info(a, "a"), Channel(sessions[1].session, b, a))
            assert (to_b.kind, to_b.endpoint) == ("derp", "relay")
            secret = b"plaintext the relay must never see" * 10
            await to_b.send(secret)
            assert await asyncio.wait_for(to_a.receive(), 5) == secret
            await to_a.send(b"and back")
            assert await asyncio.wait_for(to_b.receive(), 5) == b"and back"
            assert seen
            assert all(b"plaintext" not in payload for payload in seen)

            await sessions[1].aclose()  # b leaves: a hears that its peer is gone
            with pytest.raises(P2PConnectionFailed, match="gone"):
                await asyncio.wait_for(to_b.receive(), 5)
            await to_b.aclose()
            await to_a.aclose()
        finally:
            Mesh._forward = forward  # type: ignore[method-assign]
            for connection in sessions:
                await connection.aclose()
            await running.aclose()
        assert base64.b64decode(a.public_key) == a.public_key_bytes

    asyncio.run(main())
