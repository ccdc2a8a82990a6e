"""A tunnel that runs out of file descriptors serves again once connections close.

The ``cloudbridge tunnel`` client runs with a low descriptor limit; the test opens more
local connections than it can accept (``EMFILE``), closes them, and then expects a new
connection to be carried. Before, the first failed accept ended the accept loop: the
listener stayed open and never accepted again.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from cli_process import BIN, environment, issue_token, start, stop
from loopback import free_port

pytestmark = pytest.mark.timeout(120)

#: what the client may hold: its start-up needs about 40, each carried connection one more
DESCRIPTORS = 64


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))


def test_a_tunnel_out_of_descriptors_accepts_again(tmp_path: Path, echo_port: int) -> None:
    state = tmp_path / "relay"
    env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
        CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(free_port()),
        CLOUDBRIDGE_METRICS__ENABLED="false",
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=env, ready="client config:"
    )
    local_port = free_port()
    client = subprocess.Popen(
        [
            *(BIN / "cloudbridge", "tunnel", "--config", str(state / "client.yaml")),
            *("--control-socket", str(tmp_path / "client.sock")),
            *("--local-port", str(local_port), "--remote-host", "127.0.0.1"),
            *("--remote-port", str(echo_port)),
        ],
        env={**env, "CLOUDBRIDGE_AUTH__TOKEN": issue_token(state)},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limited,  # noqa: PLW1509 - only setrlimit, in the child before exec
    )
    try:
        assert client.stderr is not None
        assert any("tunnel 127.0.0.1:" in line for line in client.stderr), "no tunnel"
        threading.Thread(target=client.stderr.read, daemon=True).start()
        flood = [
            socket.create_connection(("127.0.0.1", local_port)) for _ in range(2 * DESCRIPTORS)
        ]
        for connection in flood:
            connection.close()
        with socket.create_connection(("127.0.0.1", local_port), timeout=20) as fresh:
            fresh.sendall(b"served again")
            assert fresh.recv(64) == b"served again"
    finally:
        client.kill()
        client.wait()
        if client.stderr is not None:
            client.stderr.close()
        assert stop(relay) == 0
