"""A relay process killed with SIGKILL ends its QUIC clients' sessions at their next
keepalive (issue 16), where they used to wait for a health check or the idle timeout
(30 s each): its closed port answers with an ICMP port unreachable, and a relay restarted
in the same state directory answers with a QUIC stateless reset."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cli_process import environment, issue_token, start
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.race import connect
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import TransportClosed
from cloudbridge_core.plugins import load_plugins
from loopback import free_port

pytestmark = pytest.mark.timeout(120)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def free_udp_port() -> int:
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Relay:
    """A relay process on loopback, on fixed ports so that a restart is found again."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.ports = {
            "tls": free_port(),
            "websocket": free_port(),
            "grpc": free_port(),
            "quic": free_udp_port(),
        }
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = environment(CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1")
        for name, port in self.ports.items():
            env[f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT"] = str(port)
        command = ("relay", "serve", "--dev", "--state-dir", str(self.state))
        self.process = start(*command, env=env, ready="client config:")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        assert self.process.stderr is not None
        self.process.stderr.close()
        self.process = None

    async def connect(self) -> RelayConnection:
        """A client's authenticated QUIC session, with a keepalive every 500 ms."""
        plugins = load_plugins()
        overrides = {
            "relay.host": "127.0.0.1",
            "relay.tls.ca_file": str(self.state / "ca.pem"),
            "auth.token": issue_token(self.state),
            "transport.mode": "quic",
            "transport.quic.port": self.ports["quic"],
            "transport.quic.keepalive_interval": "500ms",
            "metrics.enabled": False,
        }
        config = load_config(
            None,
            environ={},
            overrides={key: (value, "test") for key, value in overrides.items()},
            schema=merged_schema(plugins.config_sections()),
        )
        return await connect(config, plugins)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    relay = Relay(tmp_path / "relay")
    relay.start()
    yield relay
    if relay.process is not None:
        relay.kill()


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


async def ended(connection: RelayConnection) -> TransportClosed:
    """Why the session ended (the relay opens no streams to a client: accepting one
    waits for the end)."""
    with pytest.raises(TransportClosed) as ending:
        await asyncio.wait_for(connection.session.accept_stream(), 60)  # a hang guard
    return ending.value


@pytest.mark.parametrize("loop", LOOPS)
def test_a_killed_relay_ends_the_session_at_a_keepalive(relay: Relay, loop: str) -> None:
    async def main() -> None:
        connection = await relay.connect()
        try:
            relay.kill()
            error = await ended(connection)
        finally:
            await connection.aclose()
        assert error.message == "the relay's port is closed (ICMP port unreachable)"

    run(loop, main)


def test_a_relay_restarted_in_its_state_directory_resets_the_old_session(relay: Relay) -> None:
    key = relay.state / "reset.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first_key = key.read_bytes()

    async def main() -> None:
        connection = await relay.connect()
        try:
            # while the loop is blocked here the client sends nothing: no datagram meets
            # the closed port (the ICMP case above), the next keepalive meets the new relay
            relay.kill()
            relay.start()
            error = await ended(connection)
        finally:
            await connection.aclose()
        assert error.message == "the relay restarted (QUIC stateless reset)"

    run("asyncio", main)
    assert key.read_bytes() == first_key  # kept, not made anew
