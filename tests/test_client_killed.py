"""A client killed with many tunnelled connections open: the relay lets go of every target.

A ``cloudbridge tunnel`` client runs as a process against a relay on loopback; 50
connections go through it to a target in the test, half of them idle and half
downloading. The client is killed with SIGKILL; within the time its transport needs to
notice, the relay must close every target connection with a reset (the transfers were
cut: not a clean EOF) and hold no descriptor more than before the client came.

The relay runs in the test's process, on the standard event loop: the end of a session
and of its streams then interleave the way that once left a pump's socket open when its
clean-up was cancelled (about half the targets of a killed gRPC client stayed open).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_process import environment, start
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.relay.runner import start_relay
from cloudbridge_core.relay.tokens import issue_token
from loopback import free_port, serving

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 50
#: QUIC hears nothing from a killed client: the relay notices at its idle timeout
QUIC_IDLE = 3.0
#: how long the relay may take to close every target after the kill: TCP transports
#: learn of it at once (the kernel resets the client's connection), QUIC at its timeout
WITHIN = {"grpc": 15.0, "quic": QUIC_IDLE + 15.0}


@dataclass
class Target:
    """Accepts tunnelled connections; each answers ``ready`` to its first bytes, then
    idles or sends without end (``download``), and records how it ended."""

    port: int = 0
    outcomes: list[str] = field(default_factory=list)
    ended: threading.Condition = field(default_factory=threading.Condition)

    def run(self, connection: socket.socket) -> None:
        with connection:
            outcome = self._follow(connection)
        with self.ended:
            self.outcomes.append(outcome)
            self.ended.notify_all()

    @staticmethod
    def _follow(connection: socket.socket) -> str:
        try:
            request = connection.recv(64)
            connection.sendall(b"ready")
            if request == b"download":
                chunk = os.urandom(64 * 1024)
                while True:
                    connection.sendall(chunk)
            while connection.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        return "eof"

    def wait_for(self, count: int, within: float) -> list[str]:
        with self.ended:
            self.ended.wait_for(lambda: len(self.outcomes) >= count, timeout=within)
            return list(self.outcomes)


@contextmanager
def target() -> Iterator[Target]:
    served = Target()
    with serving(served.run) as served.port:
        yield served


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_connections(port: int) -> list[socket.socket]:
    """Connections through the tunnel, each answered by the target (so relayed)."""
    opened: list[socket.socket] = []
    try:
        for index in range(CONNECTIONS):
            application = socket.create_connection(("127.0.0.1", port), timeout=20)
            opened.append(application)
            application.sendall(b"download" if index % 2 else b"idle")
            assert application.recv(5).startswith(b"r")  # the target's "ready"
    except BaseException:
        for application in opened:
            application.close()
        raise
    return opened


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()
    assert process.stderr is not None
    process.stderr.close()


@pytest.mark.parametrize("transport", ["grpc", "quic"])
def test_a_killed_client_leaves_no_target_connection_open(tmp_path: Path, transport: str) -> None:
    quic = {"idle_timeout": f"{QUIC_IDLE:g}s", "keepalive_interval": "1s"}

    async def main() -> None:
        plugins = load_plugins()
        overrides = {
            "server.state_dir": str(tmp_path / "state"),
            "server.listen": "127.0.0.1",
            "logging.level": "warning",
            **{f"transport.quic.{key}": value for key, value in quic.items()},
        }
        config = load_config(
            None,
            environ={},
            overrides={key: (value, "test") for key, value in overrides.items()},
            schema=merged_schema(plugins.config_sections()),
        )
        relay = await start_relay(config, plugins, dev=True, port_override=0)
        assert relay.client_config is not None
        state = relay.state
        token = issue_token(
            state.signing_key,
            issuer=state.issuer,
            tenant="acme",
            subject="laptop",
            permissions=["relay:connect", "tunnel:create"],
            ttl=3600,
        )
        local_port = free_port()
        try:
            with target() as served:
                before = descriptors()
                client = await asyncio.to_thread(
                    start,
                    *("tunnel", "--config", str(relay.client_config)),
                    *("--control-socket", str(tmp_path / "client.sock")),
                    *("--local-port", str(local_port), "--remote-host", "127.0.0.1"),
                    *("--remote-port", str(served.port)),
                    env=environment(
                        CLOUDBRIDGE_AUTH__TOKEN=token,
                        CLOUDBRIDGE_TRANSPORT__MODE=transport,
                        CLOUDBRIDGE_METRICS__ENABLED="false",
                        **{f"CLOUDBRIDGE_TRANSPORT__QUIC__{k.upper()}": v for k, v in quic.items()},
                    ),
                    ready="tunnel 127.0.0.1:",
                )
                try:
                    applications = await asyncio.to_thread(open_connections, local_port)
                finally:
                    kill(client)
                for application in applications:
                    application.close()
                outcomes = await asyncio.to_thread(served.wait_for, CONNECTIONS, WITHIN[transport])
                assert len(outcomes) == CONNECTIONS, (
                    f"{CONNECTIONS - len(outcomes)} of {CONNECTIONS} target connections still "
                    f"open {WITHIN[transport]:g} s after the client was killed"
                )
                assert set(outcomes) == {"reset"}, f"a cut transfer ended cleanly: {outcomes}"
                for _ in range(100):  # the target's threads close their ends
                    if descriptors() <= before:
                        break
                    await asyncio.sleep(0.1)
                assert descriptors() <= before
        finally:
            await relay.aclose()

    asyncio.run(main())
