"""JSON log records of the lifecycle events carry the seed's fields (Part 8.2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from loopback import free_port

pytestmark = pytest.mark.timeout(120)
BIN = Path(sys.executable).parent
BASE = ("timestamp", "level", "component", "event")


def launch(log: Path, *args: str, env: dict[str, str], ready: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [BIN / "cloudbridge", "--log-format", "json", "--log-level", "debug", *args],
            stderr=sink,
            env=env,
        )
    deadline = time.monotonic() + 30
    while ready not in log.read_text():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"no {ready!r} in time"
        time.sleep(0.05)
    return process


def records(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def wait_for_event(log: Path, event: str, within: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        for record in records(log):
            if record.get("event") == event:
                return record
        assert time.monotonic() < deadline, f"no {event!r} logged"
        time.sleep(0.1)


def test_lifecycle_events_have_the_documented_fields(tmp_path: Path, echo_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDBRIDGE_")}
    ports = {name: free_port() for name in ("grpc", "websocket", "tls")}
    relay_env = {
        **env,
        "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
        "CLOUDBRIDGE_DISABLE_PLUGINS": "quic",
        "CLOUDBRIDGE_METRICS__ENABLED": "false",
        **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(p) for n, p in ports.items()},
    }
    state, relay_log, client_log = tmp_path / "D", tmp_path / "relay.log", tmp_path / "client.log"
    serve = ("relay", "serve", "--dev", "--state-dir", str(state))
    relay = launch(relay_log, *serve, env=relay_env, ready="client config:")
    token = subprocess.run(
        [
            *(BIN / "cloudbridge", "relay", "token", "issue", "--state-dir", str(state)),
            *("--tenant", "acme", "--subject", "laptop"),
            *("--permission", "relay:connect", "--permission", "tunnel:create"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    local = free_port()
    client_env = {
        **env,
        "CLOUDBRIDGE_AUTH__TOKEN": token,
        "CLOUDBRIDGE_DISABLE_PLUGINS": "quic",
        "CLOUDBRIDGE_METRICS__ENABLED": "false",
        "CLOUDBRIDGE_RETRY__PER_ERROR": "{}",
        "CLOUDBRIDGE_RETRY__INITIAL_DELAY": "200ms",
    }
    client = launch(
        client_log,
        *("tunnel", "--config", str(state / "client.yaml"), "--local-port", str(local)),
        *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
        env=client_env,
        ready="tunnel 127.0.0.1:",
    )
    try:
        with socket.create_connection(("127.0.0.1", local)) as conn:
            conn.sendall(b"hi")
            assert conn.recv(2) == b"hi"
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
        relay = launch(relay_log, *serve, env=relay_env, ready="listening")
        reconnected = wait_for_event(client_log, "reconnected")
    finally:
        client.send_signal(signal.SIGTERM)
        client.wait(30)
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)

    expected = {
        (client_log, "connected"): ("tenant_id", "session_id", "transport", "latency_ms"),
        (relay_log, "session_opened"): ("tenant_id", "session_id", "transport"),
        (client_log, "tunnel_opened"): ("session_id", "transport", "latency_ms"),
        (client_log, "reconnected"): ("tenant_id", "session_id", "transport", "duration_ms"),
        (relay_log, "shutdown"): ("duration_ms",),
        (client_log, "shutdown"): ("duration_ms",),
    }
    for (log, event), fields in expected.items():
        record = wait_for_event(log, event, within=1)
        missing = [key for key in (*BASE, *fields) if key not in record]
        assert not missing, f"{event} lacks {missing}: {record}"
    assert reconnected["level"] == "info"
    assert reconnected["component"] == "relay.link"
