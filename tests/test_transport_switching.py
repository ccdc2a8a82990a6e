"""Transport selection under real network conditions, in a namespace the test creates.

The relay runs in its own network namespace; the client runs here and reaches it over a
veth pair. UDP is dropped with an nftables rule inside the namespace, and latency comes
from a delaying TCP proxy (this kernel has no netem).

Bound on moving off a blocked QUIC (documented in docs/transports.md): at most
health_check_interval + connect_timeout (the failed ping) + race_head_start + the
fallback's handshake; with the 1s / 2s / 300ms used here, under 10 s. QUIC is first
there only because the test prefers it: ``auto`` itself tries it last.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.config import Config, load_config, merged_schema
from cloudbridge_core.plugins import Plugins, PluginSelection, load_plugins
from netns import Netns

pytestmark = pytest.mark.timeout(180)
BIN = Path(sys.executable).parent
ECHO_PORT = 7007
ECHO = f"""
import asyncio, sys
async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", {ECHO_PORT})
    print("ready", file=sys.stderr, flush=True)
    await server.serve_forever()
asyncio.run(main())
"""
DROP_QUIC = """
table inet cbtest {
  chain input { type filter hook input priority 0; policy accept; udp dport 5553 drop; }
}
"""
TCP_PORTS = {"grpc": 5554, "websocket": 5555, "tls": 5556}


def drop_tcp(names: tuple[str, ...]) -> str:
    ports = ", ".join(str(TCP_PORTS[name]) for name in names)
    return f"""
table inet cbtest {{
  chain input {{ type filter hook input priority 0; policy accept; tcp dport {{ {ports} }} drop; }}
}}
"""


@dataclass
class RelayNet:
    net: Netns
    state: Path
    token: str

    def config(self, plugins: Plugins, **settings: Any) -> Config:
        overrides = {
            "relay.host": (self.net.address, "test"),
            "auth.token": (self.token, "test"),
            "transport.health_check_interval": ("1s", "test"),
            "transport.connect_timeout": ("2s", "test"),
            "transport.race_head_start": ("300ms", "test"),
            "metrics.enabled": (False, "test"),
            **{key.replace("__", "."): (value, "test") for key, value in settings.items()},
        }
        return load_config(
            self.state / "client.yaml",
            environ={},
            overrides=overrides,
            schema=merged_schema(plugins.config_sections()),
        )

    def delay(self, listen: int, target: int, seconds: float) -> None:
        self.net.spawn(
            [sys.executable, Path(__file__).parent / "delay_proxy.py", listen, target, seconds],
            ready="ready",
        )


@pytest.fixture
def relay_net(tmp_path: Path) -> Iterator[RelayNet]:
    with Netns() as net:
        state = tmp_path / "relay"
        net.spawn(
            [BIN / "cloudbridge", "relay", "serve", "--dev", "--state-dir", state],
            ready="client config:",
            env={"CLOUDBRIDGE_SERVER__PUBLIC_HOST": net.address},
        )
        net.spawn([sys.executable, "-c", ECHO], ready="ready")
        token = subprocess.run(
            [
                *(BIN / "cloudbridge", "relay", "token", "issue", "--state-dir", state),
                *("--tenant", "acme", "--subject", "laptop"),
                *("--permission", "relay:connect", "--permission", "tunnel:create"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        yield RelayNet(net, state, token)


class Held:
    """One tunnelled TCP connection kept open across transport switches."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Held:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def echo(self, payload: bytes) -> None:
        self.writer.write(payload)
        await self.writer.drain()
        assert await asyncio.wait_for(self.reader.readexactly(len(payload)), 10) == payload

    async def finish(self) -> None:
        """Close both ways and wait for the relay's end: the session it ended on may be
        replaced (and closed by the relay) right after."""
        self.writer.write_eof()
        assert await asyncio.wait_for(self.reader.read(), 10) == b""
        self.writer.close()

    def close(self) -> None:
        self.writer.close()


async def wait_for_transport(link: RelayLink, name: str, within: float) -> float:
    started = time.monotonic()
    while link.status()["name"] != name:
        if time.monotonic() - started > within:
            raise AssertionError(f"still on {link.status()['name']}: {link.status()}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def test_udp_blocked_falls_back_and_udp_restored_comes_back_without_dropping(
    relay_net: RelayNet,
) -> None:
    async def main() -> None:
        plugins = load_plugins()
        link = RelayLink(relay_net.config(plugins, transport__prefer_protocol="quic"), plugins)
        await link.start()
        # on a loaded machine TLS may win the first race; fall-forward then moves to QUIC
        await wait_for_transport(link, "quic", within=10)
        reason = link.status()["reason"]
        assert reason == "preferred transport" or reason.startswith("fall-forward"), reason
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", ECHO_PORT), link)
        await tunnel.start()
        try:
            first = await Held.open(tunnel.port)
            await first.echo(b"over quic")
            await first.finish()

            relay_net.net.nft(DROP_QUIC)
            took = await wait_for_transport_other_than(link, "quic", within=10)
            status = link.status()
            assert "quic session lost" in status["reason"]
            print(f"moved off quic to {status['name']} in {took:.2f} s")
            held = await Held.open(tunnel.port)
            await held.echo(b"over the fallback " * 1000)

            relay_net.net.nft("delete table inet cbtest")
            took = await wait_for_transport(link, "quic", within=10)
            print(f"back on quic in {took:.2f} s")
            assert link.status()["reason"].startswith("fall-forward")
            assert link.status()["draining"], "the fallback closed under an open connection"
            await held.echo(b"still alive after the move back " * 1000)  # not dropped
            held.close()
            fresh = await Held.open(tunnel.port)
            await fresh.echo(b"new connections use quic again")
            fresh.close()
            for _ in range(50):
                if not link.status()["draining"]:
                    break
                await asyncio.sleep(0.1)
            assert link.status()["draining"] == []
            assert tunnel.statistics.errors == 0
        finally:
            await tunnel.aclose()
            await link.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("blocked", "expected"),
    [
        ((), "tls"),
        (("tls",), "websocket"),
        (("tls", "websocket"), "grpc"),
        (("tls", "websocket", "grpc"), "quic"),
    ],
)
def test_auto_settles_on_the_fastest_transport_that_gets_through(
    relay_net: RelayNet, blocked: tuple[str, ...], expected: str
) -> None:
    """``auto`` follows measured throughput (docs/transports.md): TLS, WebSocket, gRPC,
    and QUIC, several times slower in Python, only where no TCP transport gets through."""
    if blocked:
        relay_net.net.nft(drop_tcp(blocked))

    async def main() -> None:
        plugins = load_plugins()
        assert {"quic", "grpc", "websocket", "tls"} <= set(plugins.transports())
        link = RelayLink(relay_net.config(plugins), plugins)
        await link.start()
        try:
            # a loaded machine may let a later candidate win the first race; fall-forward
            # then moves to the preferred one that works
            await wait_for_transport(link, expected, within=20)
        finally:
            await link.aclose()

    asyncio.run(main())


async def wait_for_transport_other_than(link: RelayLink, name: str, within: float) -> float:
    started = time.monotonic()
    while link.status()["name"] == name:
        if time.monotonic() - started > within:
            raise AssertionError(f"still on {name}: {link.status()}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def tcp_only() -> Plugins:
    available = [r.name for r in load_plugins().records]
    udp_or_other = [n for n in ("quic", "grpc") if n in available]
    return load_plugins(PluginSelection.from_sources(config_disabled=udp_or_other))


def test_added_latency_moves_to_a_clearly_faster_transport(relay_net: RelayNet) -> None:
    relay_net.delay(16555, 5555, 0.15)  # the WebSocket path: +300 ms RTT

    async def main() -> None:
        plugins = tcp_only()
        config = relay_net.config(
            plugins,
            transport__websocket__port=16555,
            transport__prefer_protocol="websocket",
            transport__race_head_start="10s",  # start on the slow path on purpose
        )
        link = RelayLink(config, plugins)
        await link.start()
        assert link.status()["name"] == "websocket"
        await wait_for_transport(link, "tls", within=15)
        status = link.status()
        assert status["reason"].startswith("lower latency"), status
        assert status["rtt_seconds"] < 0.05
        await link.aclose()

    asyncio.run(main())


def test_a_gain_below_the_margin_does_not_move(relay_net: RelayNet) -> None:
    relay_net.delay(16555, 5555, 0.15)  # WebSocket: +300 ms RTT
    relay_net.delay(16556, 5556, 0.11)  # TLS: +220 ms, faster but not under 2/3 of 300 ms

    async def main() -> None:
        plugins = tcp_only()
        config = relay_net.config(
            plugins,
            transport__websocket__port=16555,
            transport__tls__port=16556,
            transport__prefer_protocol="websocket",
            transport__race_head_start="10s",
        )
        link = RelayLink(config, plugins)
        await link.start()
        for _ in range(100):
            if "tls" in link.status()["probes"]:
                break
            await asyncio.sleep(0.1)
        probe = link.status()["probes"]["tls"]
        assert probe["rtt_seconds"] is not None
        assert 0.2 < probe["rtt_seconds"] < link.status()["rtt_seconds"]  # faster, but not enough
        await asyncio.sleep(3)  # a few more health checks
        assert link.status()["name"] == "websocket"
        assert len(link.status()["switches"]) == 1  # only the initial choice
        await link.aclose()

    asyncio.run(main())
