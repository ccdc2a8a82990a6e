"""The exporter against a real Prometheus Pushgateway started on loopback by the test."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cloudbridge_core.log import configure_logging
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.tlsutil import generate_ca, issue_server_certificate
from cloudbridge_pushgateway.exporter import PushgatewayExporter
from cloudbridge_pushgateway.hooks import SETTINGS_SCHEMA
from prometheus_client import CollectorRegistry, Counter

pytestmark = pytest.mark.timeout(60)


def exporter_with(**settings: Any) -> PushgatewayExporter:
    """The exporter as the core builds it from a ``metrics.pushgateway`` section."""
    return PushgatewayExporter(plugin_settings(SETTINGS_SCHEMA, **settings))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_gateway(*flags: str, context: ssl.SSLContext | None = None) -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway")
    assert binary, "prometheus-pushgateway is not installed (./dev test installs it)"
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            read_back(url, "/-/ready", context)
            break
        except urllib.error.HTTPError:  # it answers: up, and asking for credentials
            break
        except OSError:
            assert time.monotonic() < deadline, "the Pushgateway did not start"
            time.sleep(0.05)
    try:
        yield url
    finally:
        process.terminate()
        process.wait()


@pytest.fixture
def gateway() -> Iterator[str]:
    with running_gateway() as url:
        yield url


def read_back(
    url: str,
    path: str = "/metrics",
    context: ssl.SSLContext | None = None,
    credentials: str | None = None,
) -> str:
    request = urllib.request.Request(f"{url}{path}")  # noqa: S310 - loopback
    if credentials is not None:
        request.add_header(
            "Authorization", f"Basic {base64.b64encode(credentials.encode()).decode()}"
        )
    with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310 - loopback
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
        exporter = exporter_with(push_url=gateway, push_interval="200ms", instance="node-a")
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
        exporter = exporter_with(push_url=gateway, instance="node-b", delete_on_exit=True)
        await exporter.start(registry)
        await asyncio.sleep(0.3)
        await exporter.stop()
        assert 'instance="node-b"' not in await asyncio.to_thread(read_back, gateway)

    asyncio.run(main())


def test_an_unreachable_gateway_is_retried_counted_and_never_blocks() -> None:
    async def main() -> None:
        registry, _ = registry_with_events(1)
        exporter = exporter_with(push_url=f"http://127.0.0.1:{free_port()}", push_interval="100ms")
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


def test_pushes_over_https_to_a_gateway_signed_by_a_private_ca(tmp_path: Path) -> None:
    ca = generate_ca("test CA")
    server = issue_server_certificate(ca, ["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(ca.certificate)
    (tmp_path / "server.pem").write_bytes(server.certificate)
    (tmp_path / "server.key").write_bytes(server.key)
    web = tmp_path / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {tmp_path / 'server.pem'}\n"
        f"  key_file: {tmp_path / 'server.key'}\n"
    )
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with running_gateway(f"--web.config.file={web}", context=trusted) as url:

        async def main() -> None:
            registry, _ = registry_with_events(5)
            exporter = exporter_with(push_url=url, instance="tls", ca_file=str(tmp_path / "ca.pem"))
            await exporter.start(registry)
            await exporter.stop()
            assert exporter.pushes >= 1
            pushed = await asyncio.to_thread(read_back, url, "/metrics", trusted)
            assert 'cloudbridge_test_events_total{instance="tls",job="cloudbridge"} 5' in pushed

            untrusting = exporter_with(push_url=url, instance="x")
            await untrusting.start(registry_with_events(1)[0])
            await untrusting.stop()
            assert untrusting.pushes == 0  # the system store does not know the private CA
            assert untrusting.failures is not None

        asyncio.run(main())


def test_credentials_in_the_url_are_not_logged(tmp_path: Path) -> None:
    async def main() -> None:
        registry, _ = registry_with_events(1)
        url = f"http://pusher:s3cret@127.0.0.1:{free_port()}"
        exporter = exporter_with(push_url=url)
        await exporter.start(registry)
        await exporter.stop()

    target = tmp_path / "cloudbridge.log"
    configure_logging(level="info", fmt="json", output=str(target))
    try:
        asyncio.run(main())
    finally:
        configure_logging()
    logged = target.read_text()
    assert "push_failed" in logged
    assert "s3cret" not in logged
    assert "pusher" not in logged


def test_basic_auth_pushes_with_the_right_password_only(tmp_path: Path) -> None:
    password = "correct horse"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  pusher: '{hashed}'\n")
    refused_registry = registry_with_events(1)[0]
    with running_gateway(f"--web.config.file={web}") as url:

        async def main() -> tuple[PushgatewayExporter, PushgatewayExporter]:
            allowed = exporter_with(
                push_url=url, instance="auth", username="pusher", password=password
            )
            await allowed.start(registry_with_events(3)[0])
            await allowed.stop()
            refused = exporter_with(push_url=url, instance="x", username="pusher", password="wrong")
            await refused.start(refused_registry)
            await refused.stop()
            return allowed, refused

        target = tmp_path / "cloudbridge.log"
        configure_logging(level="info", fmt="json", output=str(target))
        try:
            allowed, refused = asyncio.run(main())
        finally:
            configure_logging()
        assert allowed.pushes >= 1
        assert refused.pushes == 0
        assert refused_registry.get_sample_value("cloudbridge_pushgateway_push_failures_total")
        pushed = read_back(url, credentials=f"pusher:{password}")
        assert 'cloudbridge_test_events_total{instance="auth",job="cloudbridge"} 3' in pushed
        assert 'instance="x"' not in pushed
        logged = target.read_text()
        assert "push_failed" in logged
        assert password not in logged
        assert "wrong" not in logged
