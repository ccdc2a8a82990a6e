"""A relay name with several addresses (DNS round robin over a cluster, ``/etc/hosts``)
works as a list of relays: each address is raced on its own, the certificate checked
against the name.

Real processes: relays sharing one state directory's keys listen on 127.0.0.1 and
127.0.0.2, each with a certificate for the shared name (``server.public_host``); the name
is an entry of this machine's ``/etc/hosts`` that the test adds and always removes.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_process import echo_once, issue_token, start
from relay_clients import StartTunnel
from test_first_hour_connect import TRANSPORTS, free_ports, relay_env
from test_relay_hosts import SHARED_KEYS

pytestmark = pytest.mark.timeout(120)
HOSTS = Path("/etc/hosts")


@contextlib.contextmanager
def hosts_entry(name: str, addresses: list[str]) -> Iterator[None]:
    """``name`` resolves to ``addresses``, in that order, until the block ends (the lines
    are removed however it ends; other lines of the file are left as they are then)."""
    text = HOSTS.read_text()
    lead = "" if text.endswith("\n") or not text else "\n"
    with HOSTS.open("a") as hosts:
        hosts.write(lead + "".join(f"{address} {name}\n" for address in addresses))
    try:
        found = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        # RFC 6724 sorting may reorder them (longest prefix shared with the source first)
        assert [info[4][0] for info in found] == addresses, "the resolver reordered them"
        yield
    finally:
        kept = [
            line
            for line in HOSTS.read_text().splitlines(keepends=True)
            if line.split()[1:] != [name]
        ]
        HOSTS.write_text("".join(kept))


@dataclass
class NamedCluster:
    """Relays on loopback addresses, all on ``ports``, with the first one's keys and a
    certificate for ``name``."""

    home: Path
    name: str = field(default_factory=lambda: f"cb-cluster-{secrets.token_hex(4)}.test")
    ports: dict[str, int] = field(default_factory=free_ports)
    running: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def start(self, address: str) -> None:
        state = self.home / address
        if self.running:
            first = self.home / next(iter(self.running))
            state.mkdir(mode=0o700)
            for key in SHARED_KEYS:
                shutil.copy2(first / key, state / key)
        env = relay_env(
            self.ports,
            CLOUDBRIDGE_SERVER__LISTEN=address,
            CLOUDBRIDGE_SERVER__PUBLIC_HOST=self.name,  # the name its certificate carries
        )
        serve = ("relay", "serve", "--dev", "--state-dir", str(state))
        self.running[address] = start(*serve, env=env, ready="client config:")

    def client_env(self, transport: str, **extra: str) -> dict[str, str]:
        keys = self.home / next(iter(self.running))
        return relay_env(
            self.ports,
            CLOUDBRIDGE_RELAY__HOST=self.name,
            CLOUDBRIDGE_RELAY__TLS__CA_FILE=str(keys / "ca.pem"),
            CLOUDBRIDGE_TOKEN=issue_token(keys),
            CLOUDBRIDGE_TRANSPORT__MODE=transport,
            CLOUDBRIDGE_RELAY__CONNECT_TIMEOUT="20s",
            **extra,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NamedCluster]:
    cluster = NamedCluster(tmp_path)
    cluster.start("127.0.0.1")  # makes the keys the other copies
    cluster.start("127.0.0.2")
    yield cluster
    for relay in cluster.running.values():
        relay.send_signal(signal.SIGKILL)
        relay.wait(timeout=30)
        assert relay.stderr is not None
        relay.stderr.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_name_connects_at_its_address_that_answers_over_every_transport(
    cluster: NamedCluster, tunnel: StartTunnel, transport: str
) -> None:
    with hosts_entry(cluster.name, ["127.0.0.3", "127.0.0.2"]):  # nothing at .3
        client = tunnel(cluster.client_env(transport))
        status = client.wait_on(cluster.name)
        assert status["relay"]["connected_to"] == {
            "host": cluster.name,
            "address": "127.0.0.2",
            "port": cluster.ports[transport],
        }
        assert status["transport"]["name"] == transport
        reason = status["transport"]["reason"]
        assert f"{cluster.name} (127.0.0.3) failed: " in reason, reason  # tried first
        assert echo_once(client.port, b"by name") == b"by name"


def test_a_black_holed_address_of_a_name_is_passed_over_for_the_next(
    cluster: NamedCluster, tunnel: StartTunnel
) -> None:
    # takes connections (the kernel completes them) and never answers the TLS handshake
    with (
        socket.create_server(("127.0.0.3", cluster.ports["tls"]), backlog=16),
        hosts_entry(cluster.name, ["127.0.0.3", "127.0.0.2"]),
    ):
        # waiting out the black hole's connect timeout would make it "failed: no answer in
        # time", not "did not answer within" the relays' stagger
        client = tunnel(cluster.client_env("tls", CLOUDBRIDGE_TRANSPORT__CONNECT_TIMEOUT="30s"))
        status = client.wait_on(cluster.name)
        assert status["relay"]["connected_to"]["address"] == "127.0.0.2"
        reason = status["transport"]["reason"]
        expected = f"relay {cluster.name} (127.0.0.2) ({cluster.name} (127.0.0.3) did not answer"
        assert expected in reason, reason
        assert echo_once(client.port, b"past the black hole") == b"past the black hole"


def test_a_name_that_does_not_resolve_is_named_and_the_other_relays_tried(
    cluster: NamedCluster, tunnel: StartTunnel
) -> None:
    missing = f"cb-missing-{secrets.token_hex(4)}.test"
    with hosts_entry(cluster.name, ["127.0.0.2"]):
        env = cluster.client_env("tls", CLOUDBRIDGE_RELAY__HOSTS=f'["{missing}", "{cluster.name}"]')
        client = tunnel(env)
        status = client.wait_on(cluster.name)
        reason = status["transport"]["reason"]
        assert f"{missing} failed: cannot resolve {missing}" in reason, reason
