"""A broken transfer through a peer tunnel ends broken, as on a relayed tunnel.

A relay, a peer exposing the target (``cloudbridge p2p``) and a peer tunnel to it
(``cloudbridge tunnel --remote-peer``) run as processes on this machine, as users run
them; the application and the target are plain sockets in the test. Each case runs on a
direct path (ICE host candidates: the machine's own address, so the datagrams never leave
it) and on DERP through the relay. The target resets mid-transfer, or the exposing peer is
killed with SIGKILL: the application sees a reset, never a short clean EOF; a clean end
stays clean, and both peers' descriptors return to where they were.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_process import BIN, environment, issue_token, start
from loopback import free_port
from test_abnormal_ends import (
    CHUNK,
    NOTICE_WITHIN,
    TRANSPORTS,
    descriptors,
    endless_source,
    kill,
    read_until_end,
    settles_at,
    source_then,
    target,
)

pytestmark = pytest.mark.timeout(120)

#: the path the peers settle on in each mode, this machine being both peers' host
MODES = {"direct": "p2p-only", "derp": "relay-only"}
PATH_WITHIN = 40.0


@dataclass
class PeerDeployment:
    relay: subprocess.Popen[str]
    exposing: subprocess.Popen[str]
    tunnel: subprocess.Popen[str]
    local_port: int


def _peer_config(state: Path, token: str, name: str, expose: list[int]) -> Path:
    written = yaml.safe_load((state / "client.yaml").read_text())
    p2p = {
        "name": name,
        "expose": expose,
        "heartbeat_interval": "1s",
        "heartbeat_timeout": "1s",
        "peer_discovery_interval": "1s",
    }
    document = {**written, "auth": {"token": token}, "metrics": {"enabled": False}, "p2p": p2p}
    path = state / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _peer_status(control_socket: Path) -> dict[str, Any] | None:
    status = subprocess.run(
        [BIN / "cloudbridge", "status", "--control-socket", str(control_socket), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if status.returncode != 0:
        return None
    peers = json.loads(status.stdout).get("peers") or []
    return peers[0] if peers and peers[0]["connected"] else None


def _peer_path(control_socket: Path) -> str | None:
    found = _peer_status(control_socket)
    return found["path"] if found is not None else None


@contextmanager
def peers(
    tmp_path: Path, path: str, target_port: int, transport: str = "websocket"
) -> Iterator[PeerDeployment]:
    """``transport``: the one the peers' relay sessions take."""
    state = tmp_path / "relay"
    env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_LOGGING__LEVEL="warning",
        # not the default 19302: another test's relay may still hold it
        CLOUDBRIDGE_SERVER__STUN_PORT=str(free_port()),
        **{f"CLOUDBRIDGE_TRANSPORT__{name}__PORT": str(free_port()) for name in TRANSPORTS},
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=env, ready="client config:"
    )
    processes = [relay]
    try:
        token = issue_token(state, "p2p:mesh")
        # any relay transport does: it only introduces the peers (and carries DERP)
        client_env = {**env, "CLOUDBRIDGE_TRANSPORT__MODE": transport}
        exposing = start(
            *("p2p", "--config", str(_peer_config(state, token, "far", [target_port]))),
            *("--control-socket", str(tmp_path / "far.sock"), "--mode", MODES[path]),
            env=client_env,
            ready="in the mesh as",
        )
        processes.append(exposing)
        local_port = free_port()
        control = tmp_path / "near.sock"
        tunnel = start(
            *("tunnel", "--config", str(_peer_config(state, token, "near", []))),
            *("--control-socket", str(control), "--local-port", str(local_port)),
            *("--remote-peer", "far", "--remote-port", str(target_port)),
            *("--mode", MODES[path]),
            env=client_env,
            ready="tunnel 127.0.0.1:",
        )
        processes.append(tunnel)
        deadline = time.monotonic() + PATH_WITHIN
        while (on := _peer_path(control)) != path:
            assert time.monotonic() < deadline, f"the peers are on {on}, not {path}"
            time.sleep(0.2)
        yield PeerDeployment(relay, exposing, tunnel, local_port)
    finally:
        for process in reversed(processes):
            if process.returncode is None:
                kill(process)


@pytest.mark.parametrize("path", MODES)
def test_a_target_reset_reaches_the_application_as_a_reset(tmp_path: Path, path: str) -> None:
    size = 2 * 1024 * 1024
    with (
        target(source_then(size, reset=True)) as reset_target,
        peers(tmp_path, path, reset_target.port) as deployment,
        socket.create_connection(("127.0.0.1", deployment.local_port)) as application,
    ):
        application.settimeout(NOTICE_WITHIN)
        received, end = read_until_end(application)
        assert end == "reset", f"{received} of {size} bytes, then a clean EOF"


@pytest.mark.parametrize("path", MODES)
def test_a_clean_end_stays_clean_and_both_peers_free_their_descriptors(
    tmp_path: Path, path: str
) -> None:
    size = 2 * 1024 * 1024
    with (
        target(source_then(size, reset=False)) as clean_target,
        peers(tmp_path, path, clean_target.port) as deployment,
    ):
        ends = (deployment.tunnel.pid, deployment.exposing.pid)
        baselines = [descriptors(pid) for pid in ends]
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", deployment.local_port)) as application:
                application.settimeout(NOTICE_WITHIN)
                assert read_until_end(application) == (size, "eof")
        for pid, baseline in zip(ends, baselines, strict=True):
            assert settles_at(lambda pid=pid: descriptors(pid), baseline) == baseline


@pytest.mark.parametrize("path", MODES)
def test_a_killed_exposing_peer_reaches_the_application_as_a_reset(
    tmp_path: Path, path: str
) -> None:
    with (
        target(endless_source) as source,
        peers(tmp_path, path, source.port) as deployment,
    ):
        tunnel_pid = deployment.tunnel.pid
        before = descriptors(tunnel_pid)
        with socket.create_connection(("127.0.0.1", deployment.local_port)) as application:
            application.settimeout(NOTICE_WITHIN)
            received = 0
            while received < 1024 * 1024:
                received += len(application.recv(CHUNK))
            kill(deployment.exposing)
            _, end = read_until_end(application)
        assert end == "reset"
        # the connection is gone from the tunnel, and so is the session with its paths
        deadline = time.monotonic() + 10
        while descriptors(tunnel_pid) > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert descriptors(tunnel_pid) <= before


def test_a_killed_relay_reaches_the_application_over_relay_tcp_as_a_reset(tmp_path: Path) -> None:
    """Over DERP on raw connections through the relay's TLS port (``relay-tcp``, the
    peers' sessions on TLS), the relay is killed with SIGKILL mid-download: its sockets
    close under the peers' TLS, and the application sees a reset, never a clean EOF."""
    with (
        target(endless_source) as source,
        peers(tmp_path, "derp", source.port, transport="tls") as deployment,
    ):
        carried = _peer_status(tmp_path / "near.sock")
        assert carried is not None
        assert carried["protocol"] == "relay-tcp"
        with socket.create_connection(("127.0.0.1", deployment.local_port)) as application:
            application.settimeout(NOTICE_WITHIN)
            received = 0
            while received < 1024 * 1024:
                received += len(application.recv(CHUNK))
            kill(deployment.relay)
            _, end = read_until_end(application)
        assert end == "reset"
