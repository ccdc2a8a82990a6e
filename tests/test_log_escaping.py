"""Strings a stranger sends (a device name here) reach the relay's log escaped: no raw
control characters or ANSI escapes in text or JSON output, no forged lines. Black box: a
``relay serve`` process, and a client speaking the wire protocol to it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cli_process import BIN, environment, issue_token
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.race import connect
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.log import UNSAFE_CHARACTERS
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.protocol import messages
from cloudbridge_core.relay.mesh import join_proof
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from loopback import free_port

pytestmark = pytest.mark.timeout(90)
#: a device name without spaces (which would make the text renderer quote it)
HOSTILE = "\x1b[31mevil\x1b[0m\n2026-01-01T00:00:00Z\r\x07"
HOSTILE_SHOWN = "\\x1b[31mevil\\x1b[0m\\n2026-01-01T00:00:00Z\\r\\x07"


def serve(state: Path, log: Path, fmt: str) -> subprocess.Popen[bytes]:
    env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
        CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(free_port()),
        CLOUDBRIDGE_METRICS__ENABLED="false",
    )
    command = [BIN / "cloudbridge", "--log-format", fmt, "relay", "serve", "--dev"]
    with log.open("ab") as sink:
        process = subprocess.Popen([*command, "--state-dir", str(state)], stderr=sink, env=env)
    deadline = time.monotonic() + 30
    while "client config:" not in log.read_text():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the relay did not start in time"
        time.sleep(0.05)
    return process


async def join_as(connection: RelayConnection, name: str) -> None:
    """Join the tenant's mesh as device ``name``, with a valid proof of a fresh key."""
    device = X25519PrivateKey.generate()
    public = base64.b64encode(device.public_key().public_bytes_raw()).decode()
    request = messages.MeshJoin(name, public, "-----BEGIN CERTIFICATE-----")
    challenge = await connection.mesh_challenge(5)
    relay_key = X25519PublicKey.from_public_bytes(base64.b64decode(challenge.key))
    joined: asyncio.Queue[messages.Message] = asyncio.Queue()
    connection.on_message = joined.put_nowait
    await connection.control.send(
        replace(request, proof=join_proof(device.exchange(relay_key), request))
    )
    assert isinstance(await asyncio.wait_for(joined.get(), 10), messages.MeshPeers)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_hostile_peer_name_is_logged_escaped(tmp_path: Path, echo_port: int, fmt: str) -> None:
    state, log = tmp_path / "state", tmp_path / "relay.log"
    relay = serve(state, log, fmt)
    try:
        plugins = load_plugins()
        config = load_config(
            state / "client.yaml",
            environ={
                "CLOUDBRIDGE_AUTH__TOKEN": issue_token(state, "p2p:mesh"),
                "CLOUDBRIDGE_RELAY__HOST": "127.0.0.1",
                "CLOUDBRIDGE_TRANSPORT__MODE": "tls",
                "CLOUDBRIDGE_TRANSPORT__CONNECT_TIMEOUT": "20s",  # a loaded machine
            },
            schema=merged_schema(plugins.config_sections()),
        )

        async def main() -> None:
            connection = await connect(config, plugins)
            try:
                await join_as(connection, HOSTILE)
                # the relay serves on: the same session tunnels to a real target
                stream, _ = await connection.open_tunnel(f"127.0.0.1:{echo_port}")
                await stream.aclose()
            finally:
                await connection.aclose()

        asyncio.run(main())
        deadline = time.monotonic() + 10
        while "peer_joined" not in log.read_text():
            assert time.monotonic() < deadline, "the relay did not log the join"
            time.sleep(0.05)
    finally:
        relay.terminate()
        relay.wait(timeout=30)
    text = log.read_text()
    assert not UNSAFE_CHARACTERS.search(text.replace("\n", ""))
    assert not [line for line in text.splitlines() if line.startswith("2026-01-01")]
    if fmt == "json":
        values = [json.loads(line) for line in text.splitlines() if "peer_joined" in line]
        (joined,) = values
        assert joined["name"] == HOSTILE_SHOWN
        assert not UNSAFE_CHARACTERS.search(json.dumps(values, ensure_ascii=False))
    else:
        assert HOSTILE_SHOWN in text
