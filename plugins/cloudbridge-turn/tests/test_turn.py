"""The TURN strategy against a real coturn on loopback, started by the test: two peers
meet over relayed candidates only (tests/test_p2p_nat.py does it between two NATs), with
long-term credentials and with the short-lived ones a relay issues per tenant."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.errors import P2PConnectionFailed
from cloudbridge_core.log import configure_logging
from cloudbridge_core.p2p.ice import CLOSE_GRACE as ICE_CLOSE_GRACE
from cloudbridge_core.protocol.messages import TurnCredentials
from cloudbridge_core.providers import PeerInfo, Stream
from cloudbridge_core.relay.turn import TurnIssuer
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_turn.hooks import SETTINGS_SCHEMA
from cloudbridge_turn.strategy import ASK_AGAIN_AFTER, NO_SERVER, TurnServer, TurnStrategy

pytestmark = pytest.mark.timeout(60)
USER, PASSWORD = "alice", "turn-test-credential"
ROOT = Path(__file__).resolve().parents[3]


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
def running_coturn(
    tmp_path: Path, auth_secret: str | None = None, policy: str | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """coturn on a free loopback port: the port, and the process (to stop it early). With
    ``auth_secret`` it checks TURN REST API credentials (``use-auth-secret``), as a relay's
    ``server.turn`` expects, instead of its one long-term user; ``policy`` replaces the
    permissive rest of the configuration (which lets loopback peers meet)."""
    binary = shutil.which("turnserver")
    assert binary, "coturn is not installed (./dev test installs it)"
    port = free_port_both_ways()
    conf = tmp_path / "turnserver.conf"
    auth = (
        f"use-auth-secret\nstatic-auth-secret={auth_secret}\n"
        if auth_secret
        else f"lt-cred-mech\nuser={USER}:{PASSWORD}\n"
    )
    rest = policy or "realm=cloudbridge.test\nfingerprint\nno-cli\nallow-loopback-peers\n"
    conf.write_text(
        f"{rest}\n{auth}listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nlistening-port={port}\n"
        "min-port=49500\nmax-port=49700\nno-tls\nno-dtls\n"
        f"pidfile={tmp_path}/turn.pid\nuserdb={tmp_path}/turndb\nlog-file=stdout\nsimple-log\n"
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


SECRET = "shared-with-coturn"


class IssuingSignals(Signals):
    """A signal channel whose relay issues TURN credentials (``server.turn``)."""

    def __init__(self, controlling: bool, issue: Callable[[], TurnCredentials]) -> None:
        super().__init__(controlling)
        self.issue = issue
        self.asked = 0

    async def turn_credentials(self) -> TurnCredentials:
        self.asked += 1
        return self.issue()


def issuing_pair(issue: Callable[[], TurnCredentials]) -> tuple[IssuingSignals, IssuingSignals]:
    a, b = IssuingSignals(True, issue), IssuingSignals(False, issue)
    a.other, b.other = b, a
    return a, b


@pytest.fixture
def coturn_rest(tmp_path: Path) -> Iterator[int]:
    with running_coturn(tmp_path, auth_secret=SECRET) as (port, _):
        yield port


def issuer(port: int, secret: str = SECRET, ttl: float = 600) -> TurnIssuer:
    return TurnIssuer(secret.encode(), (f"turn:127.0.0.1:{port}",), ttl)


def test_relay_issued_credentials_allocate_and_win_over_static_ones(coturn_rest: int) -> None:
    async def main() -> None:
        a, b = issuing_pair(lambda: issuer(coturn_rest).issue("acme"))
        peer = PeerInfo("p", "peer", "k")
        static = settings(coturn_rest, "not-the-issued-credential")  # would be refused
        paths = await asyncio.gather(
            TurnStrategy(static).connect(peer, a),
            TurnStrategy(settings_without_servers()).connect(peer, b),
        )
        try:
            assert [p.kind for p in paths] == ["turn", "turn"]
            await paths[0].send(b"with issued credentials")
            assert await asyncio.wait_for(paths[1].receive(), 5) == b"with issued credentials"
        finally:
            for path in paths:
                await path.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(
            lambda port: issuer(port, ttl=60).issue("acme", now=time.time() - 120), id="expired"
        ),
        pytest.param(lambda port: issuer(port, secret="forged").issue("acme"), id="forged"),
        pytest.param(
            lambda port: replace(
                issuer(port).issue("acme"),
                username=issuer(port).issue("globex").username,
            ),
            id="another-tenants-name",
        ),
    ],
)
def test_expired_or_forged_credentials_are_refused_by_coturn(
    coturn_rest: int, credentials: Callable[[int], TurnCredentials]
) -> None:
    issued = credentials(coturn_rest)
    entry = {"url": issued.urls[0], "username": issued.username, "credential": issued.credential}
    static = plugin_settings(SETTINGS_SCHEMA, turn_servers=[entry])

    async def main() -> None:
        a, b = pair()
        peer = PeerInfo("p", "peer", "k")
        with pytest.raises((P2PConnectionFailed, ConnectionError, TimeoutError)):
            await asyncio.wait_for(
                asyncio.gather(
                    TurnStrategy(static).connect(peer, a), TurnStrategy(static).connect(peer, b)
                ),
                20,
            )

    asyncio.run(main())


def test_issued_credentials_are_renewed_before_they_expire() -> None:
    now = [1_000_000.0]
    issue = issuer(3478, ttl=120)
    signal = IssuingSignals(True, lambda: issue.issue("acme", now=now[0]))
    strategy = TurnStrategy(settings_without_servers(), clock=lambda: now[0])

    async def main() -> None:
        first = await strategy._server(signal)
        assert signal.asked == 1
        now[0] += 30  # still 90 s to go: kept
        assert await strategy._server(signal) == first
        assert signal.asked == 1
        now[0] += 40  # 50 s to go, under RENEW_BEFORE: asked again, new username
        renewed = await strategy._server(signal)
        assert signal.asked == 2
        assert renewed.username != first.username
        assert renewed.username.endswith(":acme")

    asyncio.run(main())


def test_issued_credentials_follow_the_turn_rest_scheme() -> None:
    issued = issuer(3478).issue("acme", now=1_700_000_000)
    assert issued.username == "1700000600:acme"
    expected = hmac.new(SECRET.encode(), issued.username.encode(), hashlib.sha1).digest()
    assert base64.b64decode(issued.credential) == expected
    assert SECRET not in repr(issuer(3478))
    assert issued.credential not in repr(issued)


def settings_without_servers() -> Mapping[str, Any]:
    return plugin_settings(SETTINGS_SCHEMA, turn_servers=[])


def documented_coturn_policy() -> str:
    """The coturn configuration docs/p2p.md recommends (the indented block after
    ``# /etc/turnserver.conf``), less what the test sets itself: ports, addresses, secret."""
    text = (ROOT / "docs" / "p2p.md").read_text(encoding="utf-8")
    block = text.split("    # /etc/turnserver.conf\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if not line.startswith("    "):
            break
        lines.append(line.strip())
    own = ("listening-port=", "tls-listening-port=", "use-auth-secret", "static-auth-secret=")
    return "\n".join(
        line for line in lines if not line.startswith(own) and "RELAY-PUBLIC-IP" not in line
    )


async def meet_with_issued_credentials(port: int) -> None:
    a, b = issuing_pair(lambda: issuer(port).issue("acme"))
    peer = PeerInfo("p", "peer", "k")
    empty = settings_without_servers()
    paths = await asyncio.wait_for(
        asyncio.gather(TurnStrategy(empty).connect(peer, a), TurnStrategy(empty).connect(peer, b)),
        20,
    )
    for path in paths:
        await path.aclose()


def test_the_documented_coturn_config_refuses_loopback_peers(tmp_path: Path) -> None:
    """The same two loopback peers, with valid credentials, meet through the documented
    configuration once it allows loopback peers, and are refused by it as documented."""
    documented = documented_coturn_policy()
    assert "\nallow-loopback-peers" not in documented
    assert "no-multicast-peers" in documented
    permissive = documented.replace("denied-peer-ip=127.0.0.0-127.255.255.255", "")
    with running_coturn(tmp_path, SECRET, f"{permissive}\nallow-loopback-peers") as (port, _):
        asyncio.run(meet_with_issued_credentials(port))
    with (
        running_coturn(tmp_path, SECRET, documented) as (port, _),
        pytest.raises((P2PConnectionFailed, ConnectionError, TimeoutError)),
    ):
        asyncio.run(meet_with_issued_credentials(port))


def test_without_any_server_the_strategy_says_it_is_unavailable() -> None:
    """Issue 18: no server configured and none issued by the relay: after the attempt that
    learns it, the strategy says why it cannot work (the peer manager skips it instead of
    failing it every round), and asks the relay again after ASK_AGAIN_AFTER."""
    now = [1_000_000.0]
    strategy = TurnStrategy(settings_without_servers(), clock=lambda: now[0])
    peer = PeerInfo("p", "peer", "k")
    assert strategy.unavailable() is None  # the relay may issue credentials: try once

    async def main() -> None:
        with pytest.raises(P2PConnectionFailed, match="no TURN server"):
            await strategy.connect(peer, Signals(True))

    asyncio.run(main())
    assert strategy.unavailable() == NO_SERVER
    now[0] += ASK_AGAIN_AFTER
    assert strategy.unavailable() is None

    configured = TurnStrategy(
        plugin_settings(
            SETTINGS_SCHEMA,
            turn_servers=[{"url": "turn:127.0.0.1", "username": USER, "credential": PASSWORD}],
        )
    )
    assert configured.unavailable() is None
