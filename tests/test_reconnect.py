"""Surviving the relay: killed with -9 and restarted, or restarted with other keys."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import environment, issue_token
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.config import Config, load_config, merged_schema
from cloudbridge_core.plugins import Plugins, PluginSelection, load_plugins
from cloudbridge_core.testing.waiting import until
from loopback import free_port

pytestmark = pytest.mark.timeout(120)
BIN = Path(sys.executable).parent


class Relay:
    """A relay process on loopback, on fixed ports so that a restart is found again."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.ports = {"websocket": free_port(), "tls": free_port(), "grpc": free_port()}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, state: Path | None = None) -> None:
        self.release()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDBRIDGE_")}
        env["CLOUDBRIDGE_SERVER__LISTEN"] = "127.0.0.1"
        env["CLOUDBRIDGE_DISABLE_PLUGINS"] = "quic"  # TCP transports: a kill is seen at once
        for name, port in self.ports.items():
            env[f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT"] = str(port)
        command = [BIN / "cloudbridge", "relay", "serve", "--dev", "--state-dir"]
        self.process = subprocess.Popen(
            [*command, state or self.state], env=env, stderr=subprocess.PIPE
        )
        assert self.process.stderr is not None
        if not any(b"client config:" in line for line in self.process.stderr):
            raise RuntimeError(f"the relay exited with {self.process.wait()}")
        # keep draining, so that the relay never blocks on (or dies of) a closed pipe
        self._drain = threading.Thread(target=self.process.stderr.read, daemon=True)
        self._drain.start()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.release()

    def release(self) -> None:
        """Wait for the last process to end and close its pipe."""
        if self.process is None:
            return
        self.process.wait()
        self._drain.join(5)
        assert self.process.stderr is not None
        self.process.stderr.close()
        self.process = None

    def token(self) -> str:
        return issue_token(self.state)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    relay = Relay(tmp_path / "relay")
    relay.start()
    yield relay
    if relay.process is not None and relay.process.poll() is None:
        relay.kill()
    relay.release()


def tcp_plugins() -> Plugins:
    return load_plugins(PluginSelection.from_sources(config_disabled=["quic"]))


def client_config(relay: Relay, plugins: Plugins) -> Config:
    overrides = {
        "relay.host": ("127.0.0.1", "test"),
        **{f"transport.{name}.port": (port, "test") for name, port in relay.ports.items()},
        "relay.tls.ca_file": (str(relay.state / "ca.pem"), "test"),
        "relay.connect_timeout": ("10s", "test"),
        "auth.token": (relay.token(), "test"),
        "transport.health_check_interval": ("1s", "test"),
        "transport.connect_timeout": ("2s", "test"),
        "retry.initial_delay": ("200ms", "test"),
        "retry.max_delay": ("1s", "test"),
        "retry.jitter": ("100ms", "test"),
        "retry.per_error": ({}, "test"),
        "metrics.enabled": (False, "test"),
    }
    schema = merged_schema(plugins.config_sections())
    return load_config(None, environ={}, overrides=overrides, schema=schema)


async def echo(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    return received


def test_relay_killed_and_restarted_the_tunnel_comes_back(relay: Relay, echo_port: int) -> None:
    async def main() -> None:
        plugins = tcp_plugins()
        link = RelayLink(client_config(relay, plugins), plugins)
        await link.start()
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", echo_port), link)
        await tunnel.start()
        try:
            assert await echo(tunnel.port, b"before") == b"before"
            tasks_before = len(asyncio.all_tasks())
            for cycle in range(3):
                relay.kill()
                for _ in range(100):
                    if link.status()["state"] == "reconnecting":
                        break
                    await asyncio.sleep(0.1)
                assert link.status()["state"] == "reconnecting", link.status()
                # a connection made while the relay is away waits for it to return
                waiting = asyncio.create_task(echo(tunnel.port, b"during the outage"))
                await asyncio.sleep(1)
                started = time.monotonic()
                relay.start()
                assert await waiting == b"during the outage"
                print(f"cycle {cycle}: served {time.monotonic() - started:.2f} s after restart")
                assert link.status()["state"] == "connected"
                assert await echo(tunnel.port, b"after") == b"after"
            assert len(asyncio.all_tasks()) <= tasks_before + 1  # nothing piles up
        finally:
            await tunnel.aclose()
            await link.aclose()

    asyncio.run(main())


def restart_with_other_keys(relay: Relay, tmp_path: Path) -> None:
    """Kill the relay and start it again with the same certificate and ports and another
    signing key: the tokens it issued before are refused."""
    relay.kill()
    other = tmp_path / "other-keys"
    other.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        shutil.copy2(relay.state / name, other / name)
    relay.start(other)


def test_a_running_client_whose_token_is_refused_exits_4_with_a_hint(
    relay: Relay, tmp_path: Path, echo_port: int
) -> None:
    """Issue 16: the client used to stay up, failing every new connection as unavailable."""
    env = environment(
        CLOUDBRIDGE_AUTH__TOKEN=relay.token(),
        CLOUDBRIDGE_DISABLE_PLUGINS="quic",
        CLOUDBRIDGE_TRANSPORT__HEALTH_CHECK_INTERVAL="1s",
        CLOUDBRIDGE_METRICS__ENABLED="false",
    )
    tunnel = subprocess.Popen(
        [
            *(BIN / "cloudbridge", "tunnel", "--config", str(relay.state / "client.yaml")),
            *("--control-socket", str(tmp_path / "client.sock"), "--local-port", "0"),
            *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert tunnel.stderr is not None
    try:
        lines = iter(tunnel.stderr)
        assert any("tunnel 127.0.0.1:" in line for line in lines), "the tunnel never started"
        restart_with_other_keys(relay, tmp_path)
        code = tunnel.wait(timeout=60)
        rest = "".join(lines)
    finally:
        tunnel.kill()
        tunnel.wait()
        tunnel.stderr.close()
    assert code == 4, rest
    assert "error: the relay refused this client's token" in rest
    assert "hint: get a new token: join with an invite" in rest


def test_a_relay_that_no_longer_accepts_the_token_stops_the_retries(
    relay: Relay, tmp_path: Path
) -> None:
    async def main() -> None:
        plugins = tcp_plugins()
        link = RelayLink(client_config(relay, plugins), plugins)
        await link.start()
        restart_with_other_keys(relay, tmp_path)
        for _ in range(300):
            if link.status()["state"] == "refused":
                break
            await asyncio.sleep(0.1)
        status = link.status()
        assert status["state"] == "refused", status
        assert "token" in status["last_error"] or "signature" in status["last_error"]
        assert link._watcher is not None
        await asyncio.sleep(0.5)
        assert link._watcher.done()  # no retry loop left running
        await link.aclose()

    asyncio.run(main())


def test_sigterm_drains_open_tunnels_and_the_client_waits_for_the_restart(
    relay: Relay, echo_port: int
) -> None:
    """The relay's goaway reaches the client at once: a connection made while the relay
    drains is not refused but waits, and is carried once the relay is back."""

    async def main() -> None:
        plugins = tcp_plugins()
        config = client_config(relay, plugins)
        slow_checks = config.data["transport"] | {"health_check_interval": "60s"}
        config.data["transport"] = slow_checks  # only the session's end can tell the client
        link = RelayLink(config, plugins)
        await link.start()
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", echo_port), link)
        await tunnel.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            assert relay.process is not None
            relay.process.send_signal(signal.SIGTERM)
            # checks come every 60 s: only the goaway can tell the client this soon
            await until(lambda: link.status()["state"] == "reconnecting")
            assert link.status()["last_error"] == "the relay is restarting"
            assert relay.process.poll() is None  # draining: the open tunnel goes on
            during_drain = asyncio.create_task(echo(tunnel.port, b"made while draining"))
            writer.write(b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
            writer.close()
            code = await asyncio.to_thread(relay.process.wait, 10)
            assert code == 0
            assert not during_drain.done()
            relay.start()
            assert await during_drain == b"made while draining"
            assert await echo(tunnel.port, b"after the restart") == b"after the restart"
        finally:
            await tunnel.aclose()
            await link.aclose()

    asyncio.run(main())


def test_a_second_sigterm_stops_the_relay_without_waiting_for_the_drain(
    relay: Relay, echo_port: int
) -> None:
    async def main() -> None:
        plugins = tcp_plugins()
        link = RelayLink(client_config(relay, plugins), plugins)
        await link.start()
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", echo_port), link)
        await tunnel.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
            writer.write(b"open")
            assert await reader.readexactly(4) == b"open"
            assert relay.process is not None
            relay.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert relay.process.poll() is None  # draining (up to 10 s) for the open tunnel
            relay.process.send_signal(signal.SIGTERM)
            # half the drain: a relay still waiting for the tunnel would not be done by then
            code = await asyncio.to_thread(relay.process.wait, 5)
            assert code == -signal.SIGTERM
            writer.close()
        finally:
            await tunnel.aclose()
            await link.aclose()

    asyncio.run(main())


def test_endpoints_that_keep_failing_open_their_circuit_until_the_relay_returns(
    relay: Relay, echo_port: int
) -> None:
    async def main() -> None:
        plugins = tcp_plugins()
        config = client_config(relay, plugins)
        config.data["retry"]["circuit_breaker"] |= {"failure_threshold": 2, "reset_timeout": "1s"}
        link = RelayLink(config, plugins)
        await link.start()
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", echo_port), link)
        await tunnel.start()
        try:
            relay.kill()
            for _ in range(200):
                if "open" in link.status()["circuits"].values():
                    break
                await asyncio.sleep(0.05)
            circuits = link.status()["circuits"]
            assert "open" in circuits.values(), circuits
            assert set(circuits) == {f"{n}://127.0.0.1:{p}" for n, p in relay.ports.items()}
            relay.start()
            assert await echo(tunnel.port, b"circuit closed again") == b"circuit closed again"
            assert "closed" in link.status()["circuits"].values()
        finally:
            await tunnel.aclose()
            await link.aclose()

    asyncio.run(main())
