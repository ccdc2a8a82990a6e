"""Local HTTP surfaces answer only this machine's names (DNS rebinding), black box."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from cli_process import echo_once, environment, issue_token, start, stop
from loopback import free_port

pytestmark = pytest.mark.timeout(90)


def get(port: int, path: str, host: str) -> tuple[int, bytes]:
    """A raw HTTP/1.1 GET with the given ``Host``: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while data := conn.recv(65536):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_relay_and_client_answer_only_loopback_or_configured_host_names(
    tmp_path: Path, echo_port: int
) -> None:
    state = tmp_path / "D"
    ports = {"tls": free_port()}  # one transport: this test is about HTTP
    relay_metrics = free_port()
    relay = start(
        *("relay", "serve", "--dev", "--state-dir", str(state)),
        env=environment(
            CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
            CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
            CLOUDBRIDGE_METRICS__PROMETHEUS_PORT=str(relay_metrics),
            CLOUDBRIDGE_METRICS__ALLOWED_HOSTS='["relay.internal"]',
            **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        ),
        ready="client config:",
    )
    config = tmp_path / "client.yaml"
    written = yaml.safe_load((state / "client.yaml").read_text())
    client_metrics = free_port()
    written["metrics"] = {"prometheus_port": client_metrics}
    config.write_text(yaml.safe_dump(written))
    local = free_port()
    tunnel = start(
        *("tunnel", "--config", str(config), "--local-port", str(local)),
        *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
        env=environment(
            CLOUDBRIDGE_AUTH__TOKEN=issue_token(state),
            CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
        ),
        ready="tunnel 127.0.0.1:",
    )
    try:
        assert echo_once(local, b"before") == b"before"
        for port, path in [
            (relay_metrics, "/metrics"),
            (relay_metrics, "/healthz"),
            (relay_metrics, "/readyz"),
            (client_metrics, "/metrics"),
            (client_metrics, "/api/v1/status"),
        ]:
            for rebound in ("evil.example", f"evil.example:{port}", f"localhost:{port + 1}"):
                status, body = get(port, path, rebound)
                assert status == 421, (path, rebound)
                assert body == b"misdirected request: Host is not this machine\n"
            for own in ("localhost", f"127.0.0.1:{port}", f"[::1]:{port}"):
                assert get(port, path, own)[0] == 200, (path, own)
        assert get(relay_metrics, "/healthz", f"relay.internal:{relay_metrics}") == (200, b"ok\n")
        assert get(client_metrics, "/metrics", "relay.internal")[0] == 421  # the relay's name
        assert echo_once(local, b"after") == b"after"  # serving on throughout
    finally:
        assert stop(tunnel) == 0
        assert stop(relay) == 0
