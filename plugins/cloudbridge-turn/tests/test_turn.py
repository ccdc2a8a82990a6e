"""The TURN strategy against a real coturn on loopback, started by the test: two peers
meet over relayed candidates only (tests/test_p2p_nat.py does it between two NATs)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.errors import P2PConnectionFailed
from cloudbridge_core.log import configure_logging
from cloudbridge_core.p2p.ice import CLOSE_GRACE as ICE_CLOSE_GRACE
from cloudbridge_core.providers import PeerInfo, Stream
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_turn.hooks import SETTINGS_SCHEMA
from cloudbridge_turn.strategy import TurnServer, TurnStrategy

pytestmark = pytest.mark.timeout(60)
USER, PASSWORD = "alice", "turn-test-credential"


def free_port_both_ways() -> int:
    """A port free for UDP and TCP alike (coturn listens on both)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@contextlib.contextmanager
def running_coturn(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """coturn on a free loopback port: the port, and the process (to stop it early)."""
    binary = shutil.which("turnserver")
    assert binary, "coturn is not installed (./dev test installs it)"
    port = free_port_both_ways()
    conf = tmp_path / "turnserver.conf"
    conf.write_text(
        f"listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nlistening-port={port}\n"
        "min-port=49500\nmax-port=49700\nrealm=cloudbridge.test\nlt-cred-mech\n"
        f"user={USER}:{PASSWORD}\nfingerprint\nno-tls\nno-dtls\nno-cli\n"
        f"allow-loopback-peers\npidfile={tmp_path}/turn.pid\nuserdb={tmp_path}/turndb\n"
        "log-file=stdout\nsimple-log\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert process.poll() is None, f"coturn exited with {process.returncode}"
            assert time.monotonic() < deadline, "coturn did not start in 30 s"
            time.sleep(0.05)
        yield port, process
    finally:
        process.terminate()
        process.wait()


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[int]:
    with running_coturn(tmp_path) as (port, _):
        yield port


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Signals:
    """One side of an in-memory signalling pair (the relay's part in real use)."""

    def __init__(self, controlling: bool) -> None:
        self.controlling = controlling
        self.inbox: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
        self.other: Signals | None = None
        self.local_key = bytes(32)

    async def send(self, message: Mapping[str, Any]) -> None:
        assert self.other is not None
        self.other.inbox.put_nowait(message)

    async def receive(self) -> Mapping[str, Any]:
        return await self.inbox.get()

    def seal(self, packet: bytes) -> bytes:
        return packet

    def open(self, sealed: bytes) -> bytes:
        return sealed

    async def open_relay_stream(self, target: str) -> Stream:
        raise AssertionError("TURN needs no relay stream")


def pair() -> tuple[Signals, Signals]:
    a, b = Signals(True), Signals(False)
    a.other, b.other = b, a
    return a, b


def settings(port: int, password: str = PASSWORD) -> Mapping[str, Any]:
    entry = {"url": f"turn:127.0.0.1:{port}", "username": USER, "credential": password}
    return plugin_settings(SETTINGS_SCHEMA, turn_servers=[entry])


def test_two_peers_meet_over_relayed_candidates(coturn: int) -> None:
    async def main() -> None:
        a, b = pair()
        peer = PeerInfo("p", "peer", "k")
        paths = await asyncio.gather(
            TurnStrategy(settings(coturn)).connect(peer, a),
            TurnStrategy(settings(coturn)).connect(peer, b),
        )
        try:
            assert [p.kind for p in paths] == ["turn", "turn"]
            assert paths[0].endpoint.startswith("127.0.0.1:")
            await paths[0].send(b"through coturn")
            assert await asyncio.wait_for(paths[1].receive(), 5) == b"through coturn"
        finally:
            for path in paths:
                await path.aclose()

    asyncio.run(main())


def test_a_path_closes_promptly_when_the_turn_server_is_gone(tmp_path: Path) -> None:
    async def main() -> None:
        with running_coturn(tmp_path) as (port, process):
            a, b = pair()
            peer = PeerInfo("p", "peer", "k")
            paths = await asyncio.gather(
                TurnStrategy(settings(port)).connect(peer, a),
                TurnStrategy(settings(port)).connect(peer, b),
            )
            process.kill()
            process.wait()
            # deleting the allocation is not waited for (about 10 s of retries otherwise)
            started = time.monotonic()
            await asyncio.gather(*(path.aclose() for path in paths))
            assert time.monotonic() - started < ICE_CLOSE_GRACE + 1

    asyncio.run(main())


def test_a_wrong_credential_fails_and_is_not_logged(coturn: int, tmp_path: Path) -> None:
    async def main() -> None:
        a, b = pair()
        peer = PeerInfo("p", "peer", "k")
        with pytest.raises((P2PConnectionFailed, ConnectionError, TimeoutError)):
            await asyncio.wait_for(
                asyncio.gather(
                    TurnStrategy(settings(coturn, "wrong-secret")).connect(peer, a),
                    TurnStrategy(settings(coturn, "wrong-secret")).connect(peer, b),
                ),
                20,
            )

    log = tmp_path / "cloudbridge.log"
    configure_logging(level="debug", fmt="json", output=str(log))
    try:
        asyncio.run(main())
    finally:
        configure_logging()
    assert "wrong-secret" not in log.read_text()


def test_urls_and_credentials_from_settings() -> None:
    server = TurnServer.from_settings(
        {"url": "turns:turn.example.com", "username": "u", "credential": "hunter2"}
    )
    assert (server.port, server.transport, server.tls) == (5349, "tcp", True)
    assert "hunter2" not in repr(server)
    tcp = TurnServer.from_settings({"url": "turn:t.example.com:3478?transport=tcp"})
    assert (tcp.port, tcp.transport) == (3478, "tcp")
    with pytest.raises(P2PConnectionFailed, match="not a TURN URL"):
        TurnServer.from_settings({"url": "http://nope"})
