"""Choosing a transport at start: the Happy Eyeballs race and fixed modes, on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.connection import attempt
from cloudbridge_core.client.link import RelayLink, clearly_better
from cloudbridge_core.config import Config, load_config, merged_schema
from cloudbridge_core.errors import ConnectionTimeout
from cloudbridge_core.plugins import Plugins, load_plugins
from cloudbridge_core.relay.runner import RunningRelay, start_relay
from cloudbridge_core.relay.tokens import issue_token

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def relay_on_loopback(tmp_path: Path, plugins: Plugins) -> AsyncIterator[RunningRelay]:
    overrides = {
        "server.state_dir": (str(tmp_path / "state"), "test"),
        "server.listen": ("127.0.0.1", "test"),
    }
    schema = merged_schema(plugins.config_sections())
    config = load_config(None, environ={}, overrides=overrides, schema=schema)
    running = await start_relay(config, plugins, dev=True, port_override=0)
    try:
        yield running
    finally:
        await running.aclose()


def client_config(relay: RunningRelay, plugins: Plugins, **settings: Any) -> Config:
    state = relay.state
    token = issue_token(
        state.signing_key,
        issuer=state.issuer,
        tenant="acme",
        subject="laptop",
        permissions=["relay:connect", "tunnel:create"],
        ttl=600,
    )
    ports = {name: listener.port for name, listener in relay.listeners.items()}
    ports.update(settings.pop("ports", {}))
    overrides = {
        "relay.host": ("127.0.0.1", "test"),
        **{f"transport.{name}.port": (port, "test") for name, port in ports.items()},
        "relay.tls.ca_file": (str(state.directory / "ca.pem"), "test"),
        "auth.token": (token, "test"),
        "metrics.enabled": (False, "test"),
        **{key.replace("__", "."): (value, "test") for key, value in settings.items()},
    }
    schema = merged_schema(plugins.config_sections())
    return load_config(None, environ={}, overrides=overrides, schema=schema)


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A UDP port where nothing answers: a QUIC relay behind a firewall dropping UDP."""
    with socket.socket(type=socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        yield silent.getsockname()[1]


def test_a_blocked_quic_costs_the_head_start_not_the_timeout(
    tmp_path: Path, silent_udp_port: int
) -> None:
    async def main() -> None:
        plugins = load_plugins()
        async with relay_on_loopback(tmp_path, plugins) as relay:
            config = client_config(
                relay,
                plugins,
                ports={"quic": silent_udp_port},
                transport__prefer_protocol="quic",  # auto itself tries it last
                transport__connect_timeout="10s",
                transport__race_head_start="300ms",
            )
            link = RelayLink(config, plugins)
            started = time.monotonic()
            await link.start()
            took = time.monotonic() - started
            status = link.status()
            # the next in preference order, or one after it on a loaded machine
            assert status["name"] in ("tls", "websocket", "grpc")
            assert status["reason"].startswith("fallback: quic")
            assert "did not answer within the head start" in status["reason"]
            assert took < 3, f"{took:.2f} s: the race waited for QUIC's timeout"
            await link.aclose()

    asyncio.run(main())


def test_a_fixed_mode_uses_only_that_transport_and_says_so_when_it_fails(
    tmp_path: Path, silent_udp_port: int
) -> None:
    async def main() -> None:
        plugins = load_plugins()
        async with relay_on_loopback(tmp_path, plugins) as relay:
            config = client_config(relay, plugins, transport__mode="websocket")
            link = RelayLink(config, plugins)
            await link.start()
            assert link.status()["name"] == "websocket"
            assert link.status()["reason"] == "transport.mode is websocket"
            await link.aclose()

            blocked = client_config(
                relay,
                plugins,
                ports={"quic": silent_udp_port},
                transport__mode="quic",
                transport__connect_timeout="1s",
            )
            with pytest.raises(ConnectionTimeout, match="no quic connection to the relay in 1s"):
                await RelayLink(blocked, plugins).start()

    asyncio.run(main())


def test_the_hysteresis_rule() -> None:
    assert clearly_better(0.100, 0.300)  # 200 ms faster and a third of it
    assert not clearly_better(0.220, 0.300)  # faster, but not under 2/3
    assert not clearly_better(0.0015, 0.010)  # under 2/3, but not 10 ms faster
    assert clearly_better(0.001, 0.020)


def test_a_thousand_reconnections_leak_nothing(tmp_path: Path) -> None:
    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    def resident_bytes() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    async def main() -> None:
        plugins = load_plugins()
        async with relay_on_loopback(tmp_path, plugins) as relay:
            config = client_config(
                relay,
                plugins,
                transport__mode="tls",
                retry__initial_delay="0s",
                retry__jitter="0s",
                retry__per_error={},
            )
            link = RelayLink(config, plugins)
            await link.start()

            switched = asyncio.Event()
            link.on_switch.append(lambda *_: switched.set())

            async def cycle() -> None:
                switched.clear()
                await link.current.session.aclose()  # the session ends under the client
                await asyncio.wait_for(switched.wait(), 10)

            for _ in range(50):  # warm up caches and pools before measuring
                await cycle()
            tasks, descriptors = len(asyncio.all_tasks()), open_descriptors()
            memory = resident_bytes()
            for _ in range(1000):
                await cycle()
            await asyncio.sleep(0.2)
            assert len(asyncio.all_tasks()) <= tasks + 2
            assert open_descriptors() <= descriptors + 4
            grown = resident_bytes() - memory
            assert grown < 16 << 20, f"{grown >> 20} MiB more after 1,000 reconnections"
            assert sum(relay.relay.sessions_by_tenant.values()) == 1
            assert len(link.status()["switches"]) == 20  # the history stays bounded
            await link.aclose()

    asyncio.run(main())


def test_a_reconnection_over_quic_resumes_the_tls_session(tmp_path: Path) -> None:
    async def main() -> None:
        plugins = load_plugins()
        async with relay_on_loopback(tmp_path, plugins) as relay:
            config = client_config(relay, plugins, transport__mode="quic")
            spec = plugins.require("transport", "quic")
            first = await attempt(config, "quic", spec, config.get("auth.token"))
            await first.ping(5)  # the relay's session ticket has arrived by now
            await first.aclose()
            second = await attempt(config, "quic", spec, config.get("auth.token"))
            assert second.session.handshake.session_resumed  # type: ignore[attr-defined]
            await second.aclose()

    asyncio.run(main())
