"""A broken transfer through a tunnel ends broken at both ends, never as a short clean EOF.

A relay and a ``cloudbridge tunnel`` client run as processes on loopback, as users run
them; the application and the tunnel's target are plain sockets in the test. Each case
breaks one part mid-transfer (the target resets, the relay or the client is killed with
SIGKILL) and checks what the surviving ends see: a reset, not an EOF. A clean end stays
clean, and the relay's descriptors return to where they were.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_process import environment, issue_token, start
from loopback import free_port, serving

pytestmark = pytest.mark.timeout(90)

TRANSPORTS = ["tls", "websocket", "grpc", "quic"]
CHUNK = 64 * 1024
#: how long a transport may take to notice that its peer process died: at once on TCP
#: (the kernel resets the connection); QUIC hears nothing and waits for its idle timeout
QUIC_IDLE = "3s"
NOTICE_WITHIN = 20.0


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Target:
    """The tunnel's target: each accepted connection runs ``behaviour``, whose outcome
    (``"eof"``, ``"reset"``, ...) is recorded in ``outcomes``."""

    behaviour: Callable[[socket.socket], str]
    port: int = 0
    outcomes: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def run(self, connection: socket.socket) -> None:
        try:
            outcome = self.behaviour(connection)
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = f"error: {exc}"
        connection.close()
        self.outcomes.append(outcome)
        self.ended.set()


@contextmanager
def target(behaviour: Callable[[socket.socket], str]) -> Iterator[Target]:
    served = Target(behaviour)
    with serving(served.run) as served.port:
        yield served


class Sink:
    """Reads until the end; counts what it received."""

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, connection: socket.socket) -> str:
        while data := connection.recv(CHUNK):
            self.received += len(data)
        return "eof"


def endless_source(connection: socket.socket) -> str:
    block = os.urandom(CHUNK)
    while True:
        connection.sendall(block)


def source_then(size: int, *, reset: bool) -> Callable[[socket.socket], str]:
    def behaviour(connection: socket.socket) -> str:
        connection.sendall(os.urandom(size))
        if reset:
            rst_close(connection)
            return "sent, then reset"
        return "sent"

    return behaviour


def read_until_end(sock: socket.socket) -> tuple[int, str]:
    """Bytes read and how the stream ended: ``"eof"`` or ``"reset"``."""
    total = 0
    try:
        while data := sock.recv(CHUNK):
            total += len(data)
    except ConnectionResetError:
        return total, "reset"
    return total, "eof"


@dataclass
class Deployment:
    relay: subprocess.Popen[str]
    client: subprocess.Popen[str] | None
    local_port: int
    #: the relay's open descriptors before the client connected
    relay_alone: int


@contextmanager
def deployed(tmp_path: Path, transport: str, target_port: int) -> Iterator[Deployment]:
    state = tmp_path / "relay"
    ports = {name: free_port() for name in TRANSPORTS}
    env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_LOGGING__LEVEL="warning",
        CLOUDBRIDGE_TRANSPORT__QUIC__IDLE_TIMEOUT=QUIC_IDLE,
        CLOUDBRIDGE_TRANSPORT__QUIC__KEEPALIVE_INTERVAL="1s",
        **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(p) for n, p in ports.items()},
    )
    serve = ("relay", "serve", "--dev", "--state-dir", str(state))
    relay = start(*serve, env=env, ready="client config:")
    local_port = free_port()
    relay_alone = descriptors(relay.pid)
    try:
        client_env = {
            **env,
            "CLOUDBRIDGE_AUTH__TOKEN": issue_token(state),
            "CLOUDBRIDGE_TRANSPORT__MODE": transport,
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
        }
        client = start(
            *("tunnel", "--config", str(state / "client.yaml")),
            *("--control-socket", str(tmp_path / "client.sock")),
            *("--local-port", str(local_port), "--remote-host", "127.0.0.1"),
            *("--remote-port", str(target_port)),
            env=client_env,
            ready="tunnel 127.0.0.1:",
        )
        deployment = Deployment(relay, client, local_port, relay_alone)
        try:
            yield deployment
        finally:
            if deployment.client is not None:
                kill(deployment.client)
    finally:
        kill(relay)


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL, as a crash or the OOM killer ends a process; idempotent."""
    process.kill()
    process.wait()
    assert process.stderr is not None
    process.stderr.close()


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settles_at(read: Callable[[], int], expected: int, within: float = 10.0) -> int:
    """``read()`` once it equals ``expected``, or its last value after ``within`` seconds."""
    deadline = time.monotonic() + within
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_target_reset_reaches_the_application_as_a_reset(tmp_path: Path, transport: str) -> None:
    size = 2 * 1024 * 1024
    with (
        target(source_then(size, reset=True)) as reset_target,
        deployed(tmp_path, transport, reset_target.port) as deployment,
    ):
        assert deployment.relay.pid
        with socket.create_connection(("127.0.0.1", deployment.local_port)) as application:
            application.settimeout(NOTICE_WITHIN)
            received, end = read_until_end(application)
        assert end == "reset", f"{received} of {size} bytes, then a clean EOF"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_clean_end_stays_clean_and_the_relay_frees_its_descriptors(
    tmp_path: Path, transport: str
) -> None:
    size = 2 * 1024 * 1024
    with (
        target(source_then(size, reset=False)) as clean_target,
        deployed(tmp_path, transport, clean_target.port) as deployment,
    ):
        relay_pid = deployment.relay.pid
        baseline = descriptors(relay_pid)
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", deployment.local_port)) as application:
                application.settimeout(NOTICE_WITHIN)
                assert read_until_end(application) == (size, "eof")
        assert settles_at(lambda: descriptors(relay_pid), baseline) == baseline


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_relay_reaches_the_application_as_a_reset(tmp_path: Path, transport: str) -> None:
    with (
        target(endless_source) as source,
        deployed(tmp_path, transport, source.port) as deployment,
        socket.create_connection(("127.0.0.1", deployment.local_port)) as application,
    ):
        application.settimeout(NOTICE_WITHIN)
        received = 0
        while received < 1024 * 1024:
            received += len(application.recv(CHUNK))
        kill(deployment.relay)
        _, end = read_until_end(application)
        assert end == "reset"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_client_reaches_the_target_as_a_reset(tmp_path: Path, transport: str) -> None:
    sink = Sink()
    with (
        target(sink) as receiver,
        deployed(tmp_path, transport, receiver.port) as deployment,
    ):
        relay_pid = deployment.relay.pid
        application = socket.create_connection(("127.0.0.1", deployment.local_port))
        block = os.urandom(CHUNK)
        deadline = time.monotonic() + NOTICE_WITHIN
        while sink.received < 1024 * 1024 and time.monotonic() < deadline:
            application.sendall(block)
        assert deployment.client is not None
        kill(deployment.client)
        deployment.client = None
        application.close()
        assert receiver.ended.wait(NOTICE_WITHIN), "the target's connection never ended"
        assert receiver.outcomes == ["reset"]
        alone = deployment.relay_alone
        assert settles_at(lambda: descriptors(relay_pid), alone) == alone


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_target_reset_during_an_upload_reaches_the_application(
    tmp_path: Path, transport: str
) -> None:
    def read_some_then_reset(connection: socket.socket) -> str:
        received = 0
        while received < 256 * 1024:
            received += len(connection.recv(CHUNK))
        rst_close(connection)
        return "reset it"

    with (
        target(read_some_then_reset) as resetting,
        deployed(tmp_path, transport, resetting.port) as deployment,
        socket.create_connection(("127.0.0.1", deployment.local_port)) as application,
    ):
        application.settimeout(NOTICE_WITHIN)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            upload_until_refused(application)


def upload_until_refused(application: socket.socket) -> None:
    """Send 6 GiB (far more than every buffer on the way holds), then read."""
    block = os.urandom(CHUNK)
    for _ in range(100_000):
        application.sendall(block)
    application.recv(CHUNK)
