"""A running client follows its config file section by section: tunnels, logging, metrics
and the mesh's p2p settings change live, and nothing else is torn down.

Real processes throughout: one ``relay serve`` for the module, and per test a
``cloudbridge tunnel`` or ``cloudbridge p2p`` whose file the test rewrites as an editor
would. The clients log JSON to a file, where the test waits for ``reloaded``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_process import echo_once, environment, issue_token, start, stop
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import Unauthorized
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.providers import Stream
from loopback import free_port

pytestmark = pytest.mark.timeout(120)
#: the built-in transport alone: quicker to start, and all these tests need
ONLY_TLS = {"CLOUDBRIDGE_DISABLE_PLUGINS": "quic,grpc,websocket"}


@dataclass
class Relay:
    state: Path

    def token(self, *permissions: str) -> str:
        return issue_token(self.state, *permissions)

    def client_config(self, path: Path, log: Path, **sections: Any) -> dict[str, Any]:
        """Write the relay's client.yaml plus ``sections`` to ``path``, logging JSON to ``log``."""
        data: dict[str, Any] = yaml.safe_load((self.state / "client.yaml").read_text())
        data["logging"] = {"format": "json", "output": str(log)}
        data["metrics"] = {"enabled": False}
        data.update(sections)
        path.write_text(yaml.safe_dump(data))
        return data


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    home = tmp_path_factory.mktemp("relay")
    config = home / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": "127.0.0.1"},
                "transport": {"tls": {"port": free_port()}},
                "metrics": {"enabled": False},
            }
        )
    )
    process = start(
        *("relay", "serve", "--dev", "--config", str(config), "--state-dir", str(home / "D")),
        env=environment(**ONLY_TLS),
        ready="client config:",
    )
    yield Relay(home / "D")
    assert stop(process) == 0


class Prefixed(socketserver.BaseRequestHandler):
    """Another target: answers what arrives with ``second:`` in front."""

    def handle(self) -> None:
        self.request.sendall(b"second:")
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def second_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Prefixed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def replace(path: Path, data: dict[str, Any]) -> None:
    """What editors do: write a sibling file and rename it over the config."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump(data))
    os.replace(temporary, path)


def records(log: Path, event: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    found = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [record for record in found if record.get("event") == event]


def wait_for(condition: Callable[[], object], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def reloaded(log: Path) -> dict[str, Any]:
    """The first ``reloaded`` record, once written."""
    wait_for(lambda: records(log, "reloaded"))
    return records(log, "reloaded")[0]


class Held:
    """A tunnelled connection kept open across a reload: it must keep echoing."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)

    def echo(self, payload: bytes, prefix: bytes = b"") -> None:
        self.socket.sendall(payload)
        wanted = prefix + payload
        received = b""
        while len(received) < len(wanted):
            data = self.socket.recv(65536)
            assert data, "the held connection was closed"
            received += data
        assert received == wanted

    def close(self) -> None:
        self.socket.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def scrape(port: int, path: str = "/metrics") -> str:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def tunnel_client(relay: Relay, config: Path, tmp_path: Path, *flags: str) -> subprocess.Popen[str]:
    return start(
        *("tunnel", "--config", str(config), "--control-socket", str(tmp_path / "c.sock")),
        *flags,
        env=environment(CLOUDBRIDGE_AUTH__TOKEN=relay.token(), **ONLY_TLS),
        ready="tunnel 127.0.0.1:",
    )


def entry(port: int, target: int, name: str | None = None) -> dict[str, Any]:
    tunnel: dict[str, Any] = {"local_port": port, "remote_host": "127.0.0.1"}
    tunnel["remote_port"] = target
    if name is not None:
        tunnel["name"] = name
    return tunnel


def test_tunnels_follow_a_reload_one_by_one(
    relay: Relay, tmp_path: Path, echo_port: int, second_port: int
) -> None:
    kept, gone, retargeted, moved, added, flag = (free_port() for _ in range(6))
    moved_to = free_port()
    config, log = tmp_path / "client.yaml", tmp_path / "client.log"
    metrics = free_port()
    data = relay.client_config(
        config,
        log,
        tunnels=[
            entry(kept, echo_port),
            entry(gone, echo_port),
            entry(retargeted, echo_port),
            entry(moved, echo_port, name="db"),
        ],
    )
    data["metrics"] = {"enabled": True, "prometheus_port": metrics}
    config.write_text(yaml.safe_dump(data))
    flags = ("--local-port", str(flag), "--remote-host", "127.0.0.1")
    client = tunnel_client(relay, config, tmp_path, *flags, "--remote-port", str(echo_port))
    busy = socket.create_server(("127.0.0.1", 0))
    taken = busy.getsockname()[1]
    try:
        held_kept, held_gone = Held(kept), Held(gone)
        held_kept.echo(b"before")
        held_gone.echo(b"before")
        data["tunnels"] = [
            entry(kept, echo_port),
            entry(retargeted, second_port),
            entry(moved_to, echo_port, name="db"),
            entry(added, echo_port),
            entry(taken, echo_port, name="on-a-busy-port"),
        ]
        replace(config, data)
        applied = reloaded(log)["applied"]
        assert f"tunnel tunnel-{gone} stopped" in applied
        assert f"tunnel tunnel-{retargeted} now to 127.0.0.1:{second_port}" in applied
        assert f"tunnel db moved to 127.0.0.1:{moved_to}" in applied
        assert f"tunnel tunnel-{added} started" in applied
        [failed] = records(log, "tunnel_not_started")
        assert failed["tunnel"] == "on-a-busy-port"
        assert failed["local"] == f"127.0.0.1:{taken}"
        assert "cloudbridge_client_tunnel_listen_failures_total 1.0" in scrape(metrics)

        assert echo_once(added, b"new") == b"new"
        assert echo_once(retargeted, b"new target") == b"second:new target"
        assert echo_once(moved_to, b"moved") == b"moved"
        assert refused(gone)
        assert refused(moved)
        # nothing else was torn down: the open connections (even the removed tunnel's),
        # the unchanged tunnel, the flag's tunnel and the relay session all carry on
        held_kept.echo(b"after")
        held_gone.echo(b"after")
        assert echo_once(kept, b"kept") == b"kept"
        assert echo_once(flag, b"flag") == b"flag"
        assert len(records(log, "connected")) == 1
        assert "cloudbridge_client_tunnels_active 5.0" in scrape(metrics)
        held_kept.close()
        held_gone.close()
    finally:
        busy.close()
        assert stop(client) == 0


def test_logging_level_follows_a_reload(relay: Relay, tmp_path: Path, echo_port: int) -> None:
    config, log = tmp_path / "client.yaml", tmp_path / "client.log"
    data = relay.client_config(config, log, tunnels=[entry(free_port(), echo_port)])
    port = data["tunnels"][0]["local_port"]
    client = tunnel_client(relay, config, tmp_path)
    try:
        held = Held(port)
        held.echo(b"at info")
        assert echo_once(port, b"at info") == b"at info"
        assert records(log, "tunnel_opened") == []  # a debug event
        data["logging"]["level"] = "debug"
        replace(config, data)
        assert reloaded(log)["applied"] == ["logging.level"]
        assert echo_once(port, b"at debug") == b"at debug"
        wait_for(lambda: records(log, "tunnel_opened"))
        held.echo(b"still open")
        held.close()
    finally:
        assert stop(client) == 0


def test_metrics_endpoint_moves_on_reload(relay: Relay, tmp_path: Path, echo_port: int) -> None:
    config, log = tmp_path / "client.yaml", tmp_path / "client.log"
    first, second = free_port(), free_port()
    data = relay.client_config(config, log, tunnels=[entry(free_port(), echo_port)])
    data["metrics"] = {"enabled": True, "prometheus_port": first}
    config.write_text(yaml.safe_dump(data))
    port = data["tunnels"][0]["local_port"]
    client = tunnel_client(relay, config, tmp_path)
    try:
        held = Held(port)
        held.echo(b"open")
        assert echo_once(port, b"12345678") == b"12345678"  # counted when it ends
        sent = 'cloudbridge_client_bytes_total{direction="sent"} 8.0'
        wait_for(lambda: sent in scrape(first))
        data["metrics"] = {"enabled": True, "prometheus_port": second, "tenant_labels": True}
        replace(config, data)
        assert reloaded(log)["applied"] == ["metrics.tenant_labels", "exporter prometheus"]
        with pytest.raises(urllib.error.URLError):
            scrape(first)
        # the counts carried on: the same registry, served at the new address
        moved = scrape(second)
        assert 'cloudbridge_client_bytes_total{direction="sent",tenant_id="acme"} 8.0' in moved
        status = json.loads(scrape(second, "/api/v1/status"))
        assert status["metrics_url"] == f"http://127.0.0.1:{second}/metrics"
        held.echo(b"still open")
        held.close()
        assert len(records(log, "connected")) == 1
    finally:
        assert stop(client) == 0


async def read_exactly(stream: Stream, count: int, early: bytes = b"") -> bytes:
    """``count`` bytes of ``stream``, starting with those that came with its acceptance."""
    data = bytearray(early)
    while len(data) < count:
        chunk = await asyncio.wait_for(stream.read(count - len(data)), 10)
        assert chunk, "the stream ended early"
        data += chunk
    return bytes(data)


def test_p2p_expose_follows_a_reload_and_a_name_change_waits_for_a_restart(
    relay: Relay, tmp_path: Path, echo_port: int, second_port: int
) -> None:
    config, log = tmp_path / "server.yaml", tmp_path / "server.log"
    p2p = {"name": "server", "expose": [echo_port], "heartbeat_interval": "1s"}
    data = relay.client_config(config, log, p2p=p2p)
    token = relay.token("p2p:mesh")
    server = start(
        *("p2p", "--mode", "relay-only", "--config", str(config)),
        *("--control-socket", str(tmp_path / "server.sock")),
        env=environment(
            CLOUDBRIDGE_AUTH__TOKEN=token, XDG_STATE_HOME=str(tmp_path / "state"), **ONLY_TLS
        ),
        ready="in the mesh as",
    )

    async def scenario() -> None:
        plugins = load_plugins()
        laptop_config = load_config(
            relay.state / "client.yaml",
            environ={},
            overrides={
                "auth.token": (token, "test"),
                "p2p.name": ("laptop", "test"),
                "transport.mode": ("tls", "test"),
            },
            schema=merged_schema(plugins.config_sections()),
        )
        link = RelayLink(laptop_config, plugins)
        await link.start()
        laptop = PeerManager(
            laptop_config, plugins, link, DeviceIdentity.create(), set(), "relay-only"
        )
        try:
            await laptop.start()
            deadline = time.monotonic() + 20
            while "server" not in [p["name"] for p in laptop.status()]:
                assert time.monotonic() < deadline, "the server never joined"
                await asyncio.sleep(0.05)
            stream, early = await laptop.open("server", echo_port, 10)
            await stream.write(b"before")
            assert await read_exactly(stream, 6, early) == b"before"
            with pytest.raises(Unauthorized, match="not exposed"):
                await laptop.open("server", second_port, 10)

            data["p2p"] = {**p2p, "expose": [second_port], "name": "renamed"}
            replace(config, data)
            record = await asyncio.to_thread(reloaded, log)
            assert record["applied"] == ["p2p.expose"]
            [restart] = records(log, "restart_required")
            assert restart["keys"] == ["p2p.name"]

            with pytest.raises(Unauthorized, match="not exposed"):
                await laptop.open("server", echo_port, 10)
            added, added_early = await laptop.open("server", second_port, 10)
            assert await read_exactly(added, 7, added_early) == b"second:"
            await added.aclose()
            # the stream opened before the reload, and the peer session, are still up
            await stream.write(b"after")
            assert await read_exactly(stream, 5) == b"after"
            await stream.aclose()
            assert [p["name"] for p in laptop.status()] == ["server"]
        finally:
            await laptop.aclose()
            await link.aclose()

    try:
        asyncio.run(scenario())
    finally:
        assert stop(server) == 0
