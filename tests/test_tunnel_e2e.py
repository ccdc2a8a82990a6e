"""Relay, JWT auth and tunnels end to end, on real loopback sockets, in one event loop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import socket
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core import tlsutil
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.errors import (
    ConfigError,
    EgressDenied,
    InvalidToken,
    LimitExceeded,
    TargetUnreachable,
    TokenExpired,
    TransportError,
    Unauthorized,
)
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.transports.mux_session import MuxSession
from cloudbridge_core.transports.tls import TlsTransport
from joserfc import jwt
from joserfc.jwk import KeySet
from relaybed import Bed, echo_server, relay_bed, round_trip, run

pytestmark = pytest.mark.timeout(120)


def forged(bed: Bed, algorithm: str) -> str:
    """A token with the relay's claims, unsigned ("none") or HMAC-keyed with its public key."""
    genuine = bed.token()
    _, body, _ = genuine.split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": algorithm}).encode()).rstrip(b"=").decode()
    if algorithm == "none":
        return f"{header}.{body}."
    secret = bed.relay.state.public_key_file.read_bytes()
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


TRANSPORTS = pytest.mark.parametrize("transport", ["tls", "websocket"])


@TRANSPORTS
def test_100_mib_each_way_and_50_concurrent_connections(tmp_path: Path, transport: str) -> None:
    async def scenario(bed: Bed) -> None:
        connection = await bed.connect()
        async with echo_server() as target:
            tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", target), connection)
            await tunnel.start()
            payload = os.urandom(100 * 1024 * 1024)
            echoed = await round_trip(tunnel.port, payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            small = [os.urandom(64 * 1024 + i) for i in range(50)]
            results = await asyncio.gather(*(round_trip(tunnel.port, p) for p in small))
            assert results == small
            stats = tunnel.statistics.to_dict()
            assert stats["total_connections"] == 51
            assert stats["active_connections"] == 0
            assert stats["errors"] == 0
            assert (
                stats["bytes_sent"]
                == stats["bytes_received"]
                == len(payload) + sum(map(len, small))
            )
            await tunnel.aclose()
        await connection.aclose()

    run(tmp_path, scenario, transport)


def test_several_tunnels_and_tenants_at_once(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        acme, globex = await bed.connect(bed.token("acme")), await bed.connect(bed.token("globex"))
        assert bed.relay.relay.sessions_by_tenant == {"acme": 1, "globex": 1}
        async with echo_server() as first, echo_server() as second:
            tunnels = [
                Tunnel(TunnelSpec(0, "127.0.0.1", port), c)
                for c in (acme, globex)
                for port in (first, second)
            ]
            for tunnel in tunnels:
                await tunnel.start()
            replies = await asyncio.gather(
                *(round_trip(t.port, f"via {i}".encode()) for i, t in enumerate(tunnels))
            )
            assert replies == [f"via {i}".encode() for i in range(4)]
            for tunnel in tunnels:
                await tunnel.aclose()
        await acme.aclose()
        await globex.aclose()

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("make_token", "error"),
    [
        (lambda bed: bed.token(ttl=-120), TokenExpired),
        (lambda bed: bed.token(now=time.time() + 3600), InvalidToken),
        (lambda bed: bed.token(permissions=["tunnel:create"]), Unauthorized),
        (lambda bed: bed.token()[:-8] + "AAAAAAAA", InvalidToken),
        (lambda bed: bed.token(issuer="https://someone-else.example.com"), InvalidToken),
        (lambda bed: bed.token(audience="another-service"), InvalidToken),
        (lambda bed: bed.token(extra={"custom:tenant_id": ""}), InvalidToken),
        (lambda bed: forged(bed, "none"), InvalidToken),
        (lambda bed: forged(bed, "HS256"), InvalidToken),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "no-relay-connect",
        "bad-signature",
        "wrong-iss",
        "wrong-aud",
        "no-tenant",
        "alg-none",
        "hs256-with-public-key",
    ],
)
@TRANSPORTS
def test_session_rejections_reach_the_client(
    tmp_path: Path, make_token: Any, error: type[Exception], transport: str
) -> None:
    async def scenario(bed: Bed) -> None:
        with pytest.raises(error):
            await bed.connect(make_token(bed))
        good = await bed.connect()  # the relay keeps serving
        await good.aclose()

    run(tmp_path, scenario, transport)


@TRANSPORTS
def test_stream_rejections_reach_the_client(tmp_path: Path, transport: str) -> None:
    async def scenario(bed: Bed) -> None:
        connect_only = await bed.connect(bed.token(permissions=["relay:connect"]))
        with pytest.raises(Unauthorized, match="tunnel:create"):
            await connect_only.open_tunnel("127.0.0.1:9")
        full = await bed.connect()
        with pytest.raises(EgressDenied, match="link-local"):
            await full.open_tunnel("169.254.169.254:80")
        with pytest.raises(EgressDenied, match="private"):
            await full.open_tunnel("10.1.2.3:22")
        with pytest.raises(TargetUnreachable):
            await full.open_tunnel("127.0.0.1:1")
        async with echo_server() as target:  # the same session still works
            stream, _ = await full.open_tunnel(f"127.0.0.1:{target}")
            await stream.write(b"ok")
            await stream.close_write()
            assert await stream.read() == b"ok"
        await connect_only.aclose()
        await full.aclose()

    run(tmp_path, scenario, transport)


def test_loopback_is_denied_outside_dev_mode(tmp_path: Path) -> None:
    async def main() -> None:
        async with relay_bed(tmp_path, dev=False) as bed, echo_server() as target:
            connection = await bed.connect()
            with pytest.raises(EgressDenied, match="loopback"):
                await connection.open_tunnel(f"127.0.0.1:{target}")
            await connection.aclose()

    asyncio.run(main())


def test_garbage_and_silent_sessions_do_not_disturb_others(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        port = bed.relay.listeners["tls"].port
        _, raw = await asyncio.open_connection("127.0.0.1", port)  # never completes TLS
        raw.write(b"\x16\x03\x01 not a handshake" * 100)
        connection = await bed.connect()
        async with echo_server() as target:
            stream, _ = await connection.open_tunnel(f"127.0.0.1:{target}")
            await stream.write(b"still fine")
            await stream.close_write()
            assert await stream.read() == b"still fine"
        raw.close()
        await connection.aclose()

    run(tmp_path, scenario)


def test_session_limit_per_tenant(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        first = await bed.connect(bed.token("acme"))
        with pytest.raises(LimitExceeded, match="sessions"):
            await bed.connect(bed.token("acme"))
        other = await bed.connect(bed.token("globex"))  # other tenants are not affected
        await first.aclose()
        await other.aclose()

    run(tmp_path, scenario, max_sessions_per_tenant=1)


def test_a_session_that_stops_heartbeating_is_reaped_and_freed(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        silent = await bed.connect(bed.token("acme"))  # authenticates, then never pings
        assert bed.relay.relay.sessions_by_tenant["acme"] == 1
        with pytest.raises(TransportError):
            await asyncio.wait_for(silent.session.accept_stream(), 10)
        assert bed.relay.relay.reaped_sessions == 1
        # the relay frees the session once its connection has closed, just after the client
        # has heard the close: the counter has nothing to wait on, so it is polled (bounded)
        async with asyncio.timeout(5):
            while bed.relay.relay.sessions_by_tenant["acme"]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        pinging = await bed.connect(bed.token("acme"))  # the tenant's slot is free again
        for _ in range(4):
            await pinging.ping(5)
            await asyncio.sleep(0.4)
        assert bed.relay.relay.reaped_sessions == 1  # a client that pings stays
        await silent.aclose()
        await pinging.aclose()

    run(tmp_path, scenario, heartbeat_timeout="1s", max_sessions_per_tenant=1)


def test_no_task_or_socket_leak_after_1000_connections(tmp_path: Path) -> None:
    def open_sockets() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario(bed: Bed) -> None:
        connection = await bed.connect()
        async with echo_server() as target:
            tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", target), connection)
            await tunnel.start()
            assert await round_trip(tunnel.port, b"warm-up") == b"warm-up"
            tasks_before, fds_before = len(asyncio.all_tasks()), open_sockets()
            for batch in range(20):
                replies = await asyncio.gather(
                    *(round_trip(tunnel.port, b"x" * (i + 1)) for i in range(50))
                )
                assert replies == [b"x" * (i + 1) for i in range(50)], batch
            refused = Tunnel(TunnelSpec(0, "127.0.0.1", 1), connection)  # nothing listens on port 1
            await refused.start()
            for _ in range(20):  # closed promptly: EOF, or a reset when our bytes were unread
                with contextlib.suppress(ConnectionResetError):
                    assert await round_trip(refused.port, b"lost") == b""
            assert refused.statistics.errors == 20
            await refused.aclose()
            # every connection's task and socket is gone once its bytes are delivered
            assert tunnel.statistics.total_connections == 1001
            assert tunnel.statistics.active_connections == 0
            # the relay side finishes its close handshakes a few loop turns later
            for _ in range(1000):
                if len(asyncio.all_tasks()) <= tasks_before and open_sockets() <= fds_before:
                    break
                await asyncio.sleep(0)
            assert len(asyncio.all_tasks()) <= tasks_before
            assert open_sockets() <= fds_before
            assert len(bed.relay.relay.sessions_by_tenant) == 1
            await tunnel.aclose()
        await connection.aclose()

    run(tmp_path, scenario)


def test_an_answer_read_after_the_tunnel_finished_arrives_whole(tmp_path: Path) -> None:
    """The application half-closes and reads the answer only once the tunnel's connection
    is done with it: the answer waits in the tunnel's socket, which must then close with
    a FIN after it (a reset would drop what the application has not read yet)."""
    size = 192 * 1024  # within one stream window: the relay sends it all unasked

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(os.urandom(size))
        await writer.drain()
        writer.close()

    async def scenario(bed: Bed) -> None:
        connection = await bed.connect()
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", server.sockets[0].getsockname()[1]), connection)
        await tunnel.start()
        loop = asyncio.get_running_loop()
        with socket.socket() as application:
            # a small receive window: most of the answer stays on the tunnel's side
            application.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            application.setblocking(False)
            await loop.sock_connect(application, ("127.0.0.1", tunnel.port))
            await loop.sock_sendall(application, b"question")
            application.shutdown(socket.SHUT_WR)
            await tunnel.aclose(drain=30.0)  # returns once the connection's pump is done
            assert tunnel.statistics.to_dict()["errors"] == 0
            received = 0
            while data := await loop.sock_recv(application, 65536):
                received += len(data)
            assert received == size
        server.close()
        await server.wait_closed()
        await connection.aclose()

    run(tmp_path, scenario)


def test_relay_serves_its_jwks_and_they_verify_its_tokens(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        port = bed.relay.listeners["websocket"].port
        url = f"https://localhost:{port}/.well-known/jwks.json"
        context = ssl.create_default_context(cafile=str(bed.state_dir / "ca.pem"))

        def fetch() -> dict[str, Any]:
            with urllib.request.urlopen(url, context=context, timeout=10) as response:
                return dict(json.load(response))

        document = await asyncio.to_thread(fetch)
        [key] = document["keys"]
        assert set(key) == {"kty", "use", "alg", "kid", "n", "e"}  # public parts only
        token = jwt.decode(bed.token(), KeySet.import_key_set(document), algorithms=["RS256"])
        assert token.claims["custom:tenant_id"] == "acme"

    run(tmp_path, scenario)


def test_relay_with_its_own_configured_certificate(tmp_path: Path) -> None:
    ca = tlsutil.generate_ca("Example Corp CA")
    server = tlsutil.issue_server_certificate(ca, ["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(server.certificate)
    (tmp_path / "key.pem").write_bytes(server.key)
    (tmp_path / "corp-ca.pem").write_bytes(ca.certificate)

    async def main() -> None:
        files = {
            "tls_cert_file": str(tmp_path / "cert.pem"),
            "tls_key_file": str(tmp_path / "key.pem"),
        }
        async with relay_bed(tmp_path, **files) as bed:
            (bed.state_dir / "ca.pem").write_bytes(
                ca.certificate
            )  # clients now trust the corporate CA
            connection = await bed.connect()
            await connection.aclose()
        with pytest.raises(ConfigError, match="go together"):
            async with relay_bed(tmp_path, tls_cert_file=str(tmp_path / "cert.pem")):
                pass

    asyncio.run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # a length far beyond the message limit
        b"\x00\x00\x00\x05nope!",  # not JSON
        messages.encode(messages.Open("127.0.0.1:22")),  # not a hello
    ],
    ids=["oversized", "not-json", "wrong-message"],
)
def test_malformed_hello_closes_only_that_session(tmp_path: Path, garbage: bytes) -> None:
    async def scenario(bed: Bed) -> None:
        client_tls = tlsutil.client_context((bed.state_dir / "ca.pem").read_bytes())
        port = bed.relay.listeners["tls"].port
        bad = await TlsTransport().connect(Endpoint("127.0.0.1", port, client_tls))
        control = await bad.open_stream()
        await control.write(garbage)
        assert isinstance(bad, MuxSession)
        await asyncio.wait_for(bad.wait_closed(), 10)  # the relay hung up on this session
        good = await bed.connect()
        async with echo_server() as target:
            stream, _ = await good.open_tunnel(f"127.0.0.1:{target}")
            await stream.write(b"unaffected")
            await stream.close_write()
            assert await stream.read() == b"unaffected"
        await bad.aclose()
        await good.aclose()

    run(tmp_path, scenario)
