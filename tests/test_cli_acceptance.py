"""The acceptance interface exactly as users type it: relay serve, token issue, tunnel, demo."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_process import BIN, echo_once, environment, issue_token, start, stop
from cloudbridge_core.config.schema import cli_schema
from cloudbridge_core.relay.state import RelayState
from jsonschema import Draft202012Validator
from loopback import free_port

pytestmark = pytest.mark.timeout(120)


def test_relay_token_tunnel(tmp_path: Path, echo_port: int) -> None:
    state = tmp_path / "D"
    relay_env = environment(
        CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(free_port()), CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1"
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=relay_env, ready="client config:"
    )
    try:
        assert (state / "client.yaml").is_file()
        issued = subprocess.run(
            [
                BIN / "cloudbridge",
                "relay",
                "token",
                "issue",
                "--state-dir",
                str(state),
                "--tenant",
                "acme",
                "--subject",
                "laptop",
                "--permission",
                "relay:connect",
                "--permission",
                "tunnel:create",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=environment(),
        )
        token = issued.stdout.strip()
        assert token.count(".") == 2
        local = free_port()
        control = tmp_path / "client.sock"
        tunnel = start(
            "tunnel",
            "--config",
            str(state / "client.yaml"),
            "--control-socket",
            str(control),
            "--local-port",
            str(local),
            "--remote-host",
            "127.0.0.1",
            "--remote-port",
            str(echo_port),
            env=environment(CLOUDBRIDGE_AUTH__TOKEN=token),
            ready="tunnel 127.0.0.1:",
        )
        try:
            with socket.create_connection(("127.0.0.1", local)) as client:
                client.sendall(b"through the relay")
                client.shutdown(socket.SHUT_WR)
                received = b""
                while data := client.recv(65536):
                    received += data
            assert received == b"through the relay"
            listed = subprocess.run(
                [BIN / "cloudbridge", "tunnel", "list", "--json", "--control-socket", str(control)],
                capture_output=True,
                text=True,
                check=True,
                env=environment(),
            )
            [entry] = json.loads(listed.stdout)["tunnels"]
            assert entry["target"] == f"127.0.0.1:{echo_port}"
            assert entry["statistics"]["total_connections"] == 1
            assert entry["statistics"]["bytes_sent"] == len(b"through the relay")
        finally:
            assert stop(tunnel) == 0
    finally:
        assert stop(relay) == 0
    assert token not in (state / "client.yaml").read_text()


def test_tunnel_list_without_a_client_says_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run(
        [BIN / "cloudbridge", "tunnel", "list", "--control-socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        env=environment(),
        check=False,
    )
    assert result.returncode == 5
    assert "no running cloudbridge client" in result.stderr


def test_tunnel_without_token_exits_4(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("relay:\n  host: 127.0.0.1\n")
    result = subprocess.run(
        [
            BIN / "cloudbridge",
            "tunnel",
            "--config",
            str(config),
            "--local-port",
            "0",
            "--remote-host",
            "h",
            "--remote-port",
            "1",
        ],
        capture_output=True,
        text=True,
        env=environment(),
        check=False,
    )
    assert result.returncode == 4
    assert "no token" in result.stderr


def test_demo_runs_by_itself(tmp_path: Path) -> None:
    result = subprocess.run(
        [BIN / "cloudbridge", "demo", "--duration", "2", "--json"],
        capture_output=True,
        text=True,
        env=environment(XDG_STATE_HOME=str(tmp_path)),
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["tunnel"]
    assert stats["errors"] == 0
    assert stats["bytes_sent"] > 0
    assert "MB/s through the tunnel" in result.stderr


def test_token_issue_claims_and_bad_input(tmp_path: Path) -> None:
    state = RelayState.load_or_create(tmp_path / "D", ["localhost"])
    base = [
        BIN / "cloudbridge",
        "relay",
        "token",
        "issue",
        "--state-dir",
        str(state.directory),
        "--tenant",
        "acme",
        "--subject",
        "db1",
        "--permission",
        "relay:connect",
    ]
    issued = subprocess.run(
        [*base, "--mesh-config", '{"peer_ip": "100.96.0.5"}', "--ttl", "1h"],
        capture_output=True,
        text=True,
        env=environment(),
        check=True,
    )
    payload = issued.stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["custom:mesh_config"] == {"peer_ip": "100.96.0.5"}
    assert claims["custom:tenant_id"] == "acme"
    assert claims["exp"] - claims["iat"] == 3600
    for bad, message in (
        (["--mesh-config", "{nope"], "--mesh-config: not valid JSON"),
        (["--ttl", "soon"], "--ttl"),
    ):
        result = subprocess.run(
            [*base, *bad], capture_output=True, text=True, env=environment(), check=False
        )
        assert result.returncode == 2
        assert message in result.stderr
    missing = subprocess.run(
        [*base[:5], str(tmp_path / "none"), *base[6:]],
        capture_output=True,
        text=True,
        env=environment(),
        check=False,
    )
    assert missing.returncode == 2
    assert "start 'cloudbridge relay serve' first" in missing.stderr


def cloudbridge_json(*args: str) -> Any:
    done = subprocess.run(
        [BIN / "cloudbridge", *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=environment(),
    )
    return json.loads(done.stdout)


def scrape(url: str) -> str:
    assert url.startswith("http://127.0.0.1:")  # the client serves metrics on loopback
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - checked above
        return str(response.read().decode())


def wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_status_shows_the_transport_and_follows_a_mode_reload(
    tmp_path: Path, echo_port: int
) -> None:
    plugins = {p["name"]: p["status"] for p in cloudbridge_json("plugins", "list")["plugins"]}
    assert {plugins[name] for name in ("quic", "grpc", "websocket")} == {"active"}
    state = tmp_path / "D"
    ports = {name: free_port() for name in ("quic", "grpc", "websocket", "tls")}
    relay_metrics = free_port()
    relay_env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_METRICS__PROMETHEUS_PORT=str(relay_metrics),
        **{f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT": str(p) for name, p in ports.items()},
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=relay_env, ready="client config:"
    )
    relay_url = f"http://127.0.0.1:{relay_metrics}"
    assert scrape(f"{relay_url}/healthz") == "ok\n"
    assert scrape(f"{relay_url}/readyz").startswith("ready: tls, websocket, grpc, quic")
    token = issue_token(state)
    written = yaml.safe_load((state / "client.yaml").read_text())
    # every enabled transport's port, in its own section
    assert {name: section["port"] for name, section in written["transport"].items()} == ports
    config = tmp_path / "client.yaml"
    metrics_port = free_port()
    written["metrics"] = {"prometheus_port": metrics_port}
    written["transport"]["health_check_interval"] = "1s"
    config.write_text(yaml.safe_dump(written))
    local = free_port()
    tunnel = start(
        *("tunnel", "--config", str(config), "--local-port", str(local)),
        *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
        env=environment(CLOUDBRIDGE_AUTH__TOKEN=token),
        ready="tunnel 127.0.0.1:",
    )
    try:

        def on_tls() -> bool:
            current = cloudbridge_json("status", "--config", str(config))["transport"]
            return bool(current["name"] == "tls")

        # auto tries the transport that carries the most first (docs/transports.md); on a
        # loaded machine WebSocket may win the first race, fall-forward then moves to TLS
        wait_for(on_tls, within=15)
        status = cloudbridge_json("status", "--config", str(config))
        Draft202012Validator(cli_schema("status")).validate(status)
        reason = status["transport"]["reason"]
        assert reason == "preferred transport" or reason.startswith("fall-forward"), reason
        assert echo_once(local, b"over tls") == b"over tls"
        assert_client_counted_one_tls_connection(status["metrics_url"])
        assert_relay_counted_one_tls_session(relay_url)

        to_websocket = {**written["transport"], "mode": "websocket"}  # the ports stay
        config.write_text(yaml.safe_dump({**written, "transport": to_websocket}))

        def on_websocket() -> bool:
            current = cloudbridge_json("status", "--config", str(config))["transport"]
            return bool(current["name"] == "websocket")

        wait_for(on_websocket, within=15)
        status = cloudbridge_json("status", "--config", str(config))
        assert status["transport"]["reason"].startswith("transport.mode changed to websocket")
        assert echo_once(local, b"over websocket") == b"over websocket"
        metrics = scrape(status["metrics_url"])
        assert 'cloudbridge_client_transport_mode{mode="websocket"} 1.0' in metrics
        assert 'cloudbridge_client_transport_mode{mode="tls"} 0.0' in metrics
        text = subprocess.run(
            [BIN / "cloudbridge", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
            env=environment(),
        ).stdout
        assert "Transport:  websocket (mode websocket) - transport.mode changed" in text
    finally:
        assert stop(tunnel) == 0
        assert stop(relay) == 0


def assert_client_counted_one_tls_connection(metrics_url: str) -> None:
    metrics = scrape(metrics_url)
    assert 'cloudbridge_client_transport_mode{mode="tls"} 1.0' in metrics
    assert 'cloudbridge_client_bytes_total{direction="sent"} 8.0' in metrics
    assert "cloudbridge_client_tunnel_setup_seconds_count 1.0" in metrics
    assert "cloudbridge_client_tunnels_active 1.0" in metrics
    families = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE")}
    assert families
    assert all(name.startswith("cloudbridge_client_") for name in families), families
    api = json.loads(scrape(metrics_url.replace("/metrics", "/api/v1/status")))
    Draft202012Validator(cli_schema("status")).validate(api)
    assert api["transport"]["name"] == "tls"


def assert_relay_counted_one_tls_session(relay_url: str) -> None:
    relay_side = scrape(f"{relay_url}/metrics")
    assert 'cloudbridge_relay_sessions{transport="tls"} 1.0' in relay_side
    assert 'cloudbridge_relay_bytes_total{direction="to_target"} 8.0' in relay_side
    assert 'cloudbridge_relay_sessions_opened_total{transport="tls"} 1.0' in relay_side
    families = {line.split()[2] for line in relay_side.splitlines() if line.startswith("# TYPE")}
    assert all(name.startswith("cloudbridge_relay_") for name in families), families


def test_health_reports_the_seed_shape_and_answers_by_exit_code(tmp_path: Path) -> None:
    state = tmp_path / "D"
    ports = {name: free_port() for name in ("quic", "grpc", "websocket", "tls")}
    relay_env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        **{f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT": str(p) for name, p in ports.items()},
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=relay_env, ready="client config:"
    )
    config = str(state / "client.yaml")
    with_token = environment(CLOUDBRIDGE_AUTH__TOKEN=issue_token(state))

    def health(*args: str, env: dict[str, str] = with_token) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "cloudbridge", "health", "--config", config, *args],
            check=False,
            capture_output=True,
            text=True,
            env=env,
        )

    try:
        done = health("--format", "json")
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert document["status"] == "healthy"
        details = document["details"]
        assert set(details) == {
            "network_connectivity",
            "authentication",
            "relay_connection",
            "p2p_mesh",
            "performance",
        }
        assert details["relay_connection"]["status"] == "connected"
        assert details["relay_connection"]["transport"] == "tls"
        Draft202012Validator(cli_schema("health")).validate(document)
        assert details["relay_connection"]["latency_seconds"] > 0
        assert 86000 < details["authentication"]["token_expires_in_seconds"] <= 86400
        assert details["performance"]["packet_loss_ratio"] == 0
        ready = health("--check", "ready")
        assert (ready.returncode, ready.stdout) == (0, "")
        refused = health("--format", "json", env=environment(CLOUDBRIDGE_AUTH__TOKEN="x.y.z"))
        assert refused.returncode == 4  # an auth failure (docs/errors.md)
        assert json.loads(refused.stdout)["details"]["authentication"]["status"] == "error"
    finally:
        assert stop(relay) == 0
    down = health("--format", "json")
    assert down.returncode == 6
    assert json.loads(down.stdout)["status"] == "unhealthy"
    assert health("--check", "ready").returncode == 6
    live = health("--check", "live")
    assert (live.returncode, live.stdout) == (0, "")


def test_tenant_labels_on_client_and_relay_metrics(tmp_path: Path, echo_port: int) -> None:
    """``metrics.tenant_labels``: the client labels every sample with its one tenant; the
    relay adds sessions by tenant. Served by the built-in ``prometheus`` exporter plugin."""
    plugins = {p["name"]: p for p in cloudbridge_json("plugins", "list")["plugins"]}
    assert plugins["prometheus"]["builtin"]
    assert plugins["prometheus"]["providers"] == {"exporter": ["prometheus"]}
    state = tmp_path / "D"
    ports = {name: free_port() for name in ("websocket", "tls")}
    relay_metrics = free_port()
    relay_env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc",
        CLOUDBRIDGE_METRICS__PROMETHEUS_PORT=str(relay_metrics),
        CLOUDBRIDGE_METRICS__TENANT_LABELS="true",
        **{f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT": str(p) for name, p in ports.items()},
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=relay_env, ready="client config:"
    )
    config = tmp_path / "client.yaml"
    written = yaml.safe_load((state / "client.yaml").read_text())
    client_metrics = free_port()
    written["metrics"] = {"prometheus_port": client_metrics, "tenant_labels": True}
    config.write_text(yaml.safe_dump(written))
    local = free_port()
    tunnel = start(
        *("tunnel", "--config", str(config), "--local-port", str(local)),
        *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
        env=environment(
            CLOUDBRIDGE_AUTH__TOKEN=issue_token(state), CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc"
        ),
        ready="tunnel 127.0.0.1:",
    )
    try:
        assert echo_once(local, b"labelled") == b"labelled"
        samples = [
            line
            for line in scrape(f"http://127.0.0.1:{client_metrics}/metrics").splitlines()
            if line and not line.startswith("#")
        ]
        assert samples
        assert all('tenant_id="acme"' in line for line in samples), samples
        assert 'cloudbridge_client_bytes_total{direction="sent",tenant_id="acme"} 8.0' in samples
        relay_side = scrape(f"http://127.0.0.1:{relay_metrics}/metrics")
        assert 'cloudbridge_relay_tenant_sessions{tenant_id="acme"} 1.0' in relay_side
    finally:
        assert stop(tunnel) == 0
        assert stop(relay) == 0
