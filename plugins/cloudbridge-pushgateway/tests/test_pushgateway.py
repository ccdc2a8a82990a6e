"""The exporter against a real Prometheus Pushgateway started on loopback by the test."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudbridge_core.plugins import load_plugins
from cloudbridge_pushgateway.exporter import PushgatewayExporter
from prometheus_client import CollectorRegistry, Counter

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway")
    assert binary, "prometheus-pushgateway is not installed (./dev test installs it)"
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):  # noqa: S310 - loopback
                break
        except OSError:
            assert time.monotonic() < deadline, "the Pushgateway did not start"
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait()


def read_back(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310 - loopback
        return str(response.read().decode())


def registry_with_events(count: int) -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    events = Counter("cloudbridge_test_events", "Events.", registry=registry)
    events.inc(count)
    return registry, events


def test_discovered_as_an_exporter() -> None:
    [record] = [r for r in load_plugins().records if r.name == "pushgateway"]
    assert record.status == "active"
    assert record.providers == {"exporter": ["pushgateway"]}


def test_pushes_periodically_and_once_more_at_stop(gateway: str) -> None:
    async def main() -> None:
        registry, events = registry_with_events(3)
        exporter = PushgatewayExporter(
            {"push_url": gateway, "push_interval": "200ms", "instance": "node-a"}
        )
        await exporter.start(registry)
        for _ in range(50):
            if 'cloudbridge_test_events_total{instance="node-a",job="cloudbridge"} 3' in (
                await asyncio.to_thread(read_back, gateway)
            ):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the value never reached the gateway")
        events.inc(4)
        await exporter.stop()  # pushes the final value
        pushed = await asyncio.to_thread(read_back, gateway)
        assert 'cloudbridge_test_events_total{instance="node-a",job="cloudbridge"} 7' in pushed
        await exporter.stop()  # idempotent

    asyncio.run(main())


def test_delete_on_exit_removes_the_group(gateway: str) -> None:
    async def main() -> None:
        registry, _ = registry_with_events(1)
        exporter = PushgatewayExporter(
            {"push_url": gateway, "instance": "node-b", "delete_on_exit": True}
        )
        await exporter.start(registry)
        await asyncio.sleep(0.3)
        await exporter.stop()
        assert 'instance="node-b"' not in await asyncio.to_thread(read_back, gateway)

    asyncio.run(main())


def test_an_unreachable_gateway_is_retried_counted_and_never_blocks() -> None:
    async def main() -> None:
        registry, _ = registry_with_events(1)
        exporter = PushgatewayExporter(
            {"push_url": f"http://127.0.0.1:{free_port()}", "push_interval": "100ms"}
        )
        await exporter.start(registry)
        started = time.monotonic()
        ticks = 0
        while time.monotonic() - started < 1.5:  # the loop stays responsive meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks > 50
        assert exporter.failures is not None
        assert exporter.failures._value.get() >= 2  # retried, with backoff
        assert exporter.pushes == 0
        await exporter.stop()

    asyncio.run(main())
