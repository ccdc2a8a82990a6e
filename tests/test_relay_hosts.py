"""A client that knows several relays (``relay.hosts``): it connects to the first that
answers, fails over when its relay dies and comes back, without a restart.

Real processes: relays that share one state directory's keys (one CA, one token for all)
listen on different loopback addresses (127.0.0.1, 127.0.0.2: Linux answers all of 127/8)
on the same port, and a ``cloudbridge tunnel`` process whose ``status --json`` says which
relay it is on.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cli_process import echo_once, issue_token, start
from loopback import free_port
from relay_clients import StartTunnel
from test_first_hour_connect import cloudbridge, relay_env

pytestmark = pytest.mark.timeout(120)
#: the built-in transport alone: quicker to start, and a kill is seen at once over TCP
ONLY_TLS = {"CLOUDBRIDGE_DISABLE_PLUGINS": "quic,grpc,websocket"}
#: what a relay of the cluster shares with the first one: its CA, token keys, reset key
SHARED_KEYS = ("ca.pem", "ca.key", "signing-key.pem", "signing-key.pub.pem", "reset.key")


@dataclass
class Cluster:
    """Relays on loopback addresses, all on ``port``, all with the first one's keys."""

    home: Path
    port: int = field(default_factory=free_port)
    running: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def state(self, address: str) -> Path:
        return self.home / address

    def start(self, address: str) -> None:
        state = self.state(address)
        first = self.state("127.0.0.1")
        if address != "127.0.0.1" and not state.exists():
            state.mkdir(mode=0o700)
            for name in SHARED_KEYS:
                shutil.copy2(first / name, state / name)
        env = relay_env(
            {"tls": self.port},
            CLOUDBRIDGE_SERVER__LISTEN=address,
            CLOUDBRIDGE_SERVER__PUBLIC_HOST=address,  # the name its certificate carries
            **ONLY_TLS,
        )
        serve = ("relay", "serve", "--dev", "--state-dir", str(state))
        self.running[address] = start(*serve, env=env, ready="client config:")

    def kill(self, address: str) -> None:
        relay = self.running.pop(address)
        relay.send_signal(signal.SIGKILL)
        relay.wait(timeout=30)
        assert relay.stderr is not None
        relay.stderr.close()

    def client_env(self, hosts: list[str] | None, **extra: str) -> dict[str, str]:
        """The client's environment; ``hosts`` None leaves ``relay.hosts`` to its file."""
        listed = {} if hosts is None else {"CLOUDBRIDGE_RELAY__HOSTS": json.dumps(hosts)}
        return relay_env(
            {"tls": self.port},
            **listed,
            CLOUDBRIDGE_RELAY__TLS__CA_FILE=str(self.state("127.0.0.1") / "ca.pem"),
            CLOUDBRIDGE_TOKEN=issue_token(self.state("127.0.0.1")),
            CLOUDBRIDGE_TRANSPORT__HEALTH_CHECK_INTERVAL="1s",
            CLOUDBRIDGE_RETRY__INITIAL_DELAY="100ms",
            CLOUDBRIDGE_RETRY__MAX_DELAY="500ms",
            CLOUDBRIDGE_RETRY__PER_ERROR="{}",
            CLOUDBRIDGE_RELAY__CONNECT_TIMEOUT="20s",
            **ONLY_TLS,
            **extra,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    cluster.start("127.0.0.1")  # the first relay makes the keys the others copy
    yield cluster
    for address in list(cluster.running):
        cluster.kill(address)


def test_the_client_connects_to_the_relay_that_answers(
    cluster: Cluster, tunnel: StartTunnel
) -> None:
    cluster.start("127.0.0.2")
    client = tunnel(cluster.client_env(["127.0.0.3", "127.0.0.2"]))  # nothing at .3
    status = client.wait_on("127.0.0.2")
    assert status["relay"]["connected_to"] == {
        "host": "127.0.0.2",
        "address": "127.0.0.2",
        "port": cluster.port,
    }
    assert status["relay"]["hosts"] == ["127.0.0.3", "127.0.0.2"]
    assert "127.0.0.3 failed: refused" in status["transport"]["reason"], status
    assert echo_once(client.port, b"via the second relay") == b"via the second relay"
    shown, _ = cloudbridge("status", "--control-socket", str(client.socket), env=client.env)
    assert f"Relay:      127.0.0.2 (127.0.0.2:{cluster.port}) via tls" in shown.stdout


def test_a_running_client_fails_over_and_back_without_a_restart(
    cluster: Cluster, tunnel: StartTunnel
) -> None:
    cluster.start("127.0.0.2")
    client = tunnel(cluster.client_env(["127.0.0.1", "127.0.0.2"]))
    client.wait_on("127.0.0.1")
    assert echo_once(client.port, b"on the first") == b"on the first"
    lost = client.status()["relay"]["session_id"]

    cluster.kill("127.0.0.1")
    moved = client.wait_on("127.0.0.2")
    assert moved["relay"]["session_id"] != lost
    assert echo_once(client.port, b"on the second") == b"on the second"

    cluster.start("127.0.0.1")
    cluster.kill("127.0.0.2")
    client.wait_on("127.0.0.1")
    assert echo_once(client.port, b"back on the first") == b"back on the first"
    assert client.process.poll() is None  # the same process all along


def test_a_black_holed_relay_is_passed_over_for_the_next(
    cluster: Cluster, tunnel: StartTunnel
) -> None:
    cluster.start("127.0.0.2")
    # takes connections (the kernel completes them) and never answers the TLS handshake
    with socket.create_server(("127.0.0.4", cluster.port), backlog=16):
        # a black hole costs the relays' stagger: waiting out its connect timeout would not
        # be "did not answer within" the stagger, but "failed: no answer in time"
        env = cluster.client_env(
            ["127.0.0.4", "127.0.0.2"], CLOUDBRIDGE_TRANSPORT__CONNECT_TIMEOUT="30s"
        )
        client = tunnel(env)
        status = client.wait_on("127.0.0.2")
        reason = status["transport"]["reason"]
        assert "relay 127.0.0.2 (127.0.0.4 did not answer within" in reason, reason
        assert echo_once(client.port, b"past the black hole") == b"past the black hole"


def test_a_changed_relay_hosts_moves_the_running_client(
    cluster: Cluster, tunnel: StartTunnel, tmp_path: Path
) -> None:
    cluster.start("127.0.0.2")
    config = tmp_path / "client.yaml"
    config.write_text(yaml.safe_dump({"relay": {"hosts": ["127.0.0.1"]}}))
    client = tunnel(cluster.client_env(None), "--config", str(config))
    client.wait_on("127.0.0.1")
    # as an editor saves it: a new file moved over the old one
    edited = tmp_path / "client.yaml.new"
    edited.write_text(yaml.safe_dump({"relay": {"hosts": ["127.0.0.2", "127.0.0.1"]}}))
    edited.replace(config)
    status = client.wait_on("127.0.0.2")
    assert status["relay"]["hosts"] == ["127.0.0.2", "127.0.0.1"]
    assert "relay.hosts changed" in status["transport"]["reason"], status
    assert echo_once(client.port, b"after the reload") == b"after the reload"
