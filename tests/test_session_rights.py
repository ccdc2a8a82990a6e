"""A session lasts as long as its token: at ``exp`` (plus ``server.token_expiry_grace``) the
relay ends it unless the client presented a fresh token on it (``refresh``); in between,
new tunnels are refused with ``token_expired``. Meanwhile other clients are served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml
from cli_process import BIN, environment
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.tokens import token_expires_in
from cloudbridge_core.errors import TokenExpired, TransportError, Unauthorized
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.protocol import messages
from cloudbridge_core.relay.tokens import issue_token
from relaybed import BOTH, Bed, echo_server, run

pytestmark = pytest.mark.timeout(60)
GRACE = 1.0
MESH = [*BOTH, "p2p:mesh"]


def exp_of(token: str) -> float:
    left = token_expires_in(token)
    assert left is not None
    return time.time() + left


async def until(moment: float) -> None:
    """Wait for a point in time (the token's clock), not for readiness."""
    await asyncio.sleep(max(0.0, moment - time.time()))


async def tunnel_works(connection: RelayConnection, port: int) -> None:
    stream, _ = await connection.open_tunnel(f"127.0.0.1:{port}")
    await stream.write(b"ping")
    assert await asyncio.wait_for(stream.read(), 5) == b"ping"
    await stream.aclose()


async def ended_by_relay(connection: RelayConnection, within: float) -> float:
    """Wait for the relay to close the session; when it did (time.time())."""
    with pytest.raises(TransportError):
        await asyncio.wait_for(connection.session.accept_stream(), within)
    return time.time()


def expired_sessions(bed: Bed) -> float:
    registry = bed.relay.relay.metrics.registry
    return registry.get_sample_value("cloudbridge_relay_sessions_expired_total") or 0.0


def test_tunnels_are_refused_after_exp_and_the_session_ends(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        async with echo_server() as port:
            bystander = await bed.connect()
            token = bed.token(ttl=3)
            exp = exp_of(token)
            short = await bed.connect(token)
            await tunnel_works(short, port)
            await until(exp + 0.05)
            with pytest.raises(TokenExpired):
                await short.open_tunnel(f"127.0.0.1:{port}")
            await tunnel_works(bystander, port)
            ended_at = await ended_by_relay(short, GRACE + 3)
            assert exp + GRACE - 0.2 <= ended_at < exp + GRACE + 1.5
            for _ in range(50):  # the relay's reason arrives just before the end
                if short.ended is not None:
                    break
                await asyncio.sleep(0.02)
            assert isinstance(short.ended, TokenExpired)
            assert expired_sessions(bed) == 1
            await tunnel_works(bystander, port)
            assert await bystander.ping(5) > 0
            for each in (short, bystander):
                await each.aclose()

    run(tmp_path, scenario, token_expiry_grace=f"{GRACE:g}s")


class MeshClient:
    """A session in the mesh, speaking the protocol itself (what arrives lands in ``inbox``)."""

    def __init__(self, connection: RelayConnection, name: str) -> None:
        self.connection = connection
        self.name = name
        self.identity = DeviceIdentity.create()
        self.inbox: asyncio.Queue[messages.Message] = asyncio.Queue()
        connection.on_message = self.inbox.put_nowait

    async def send_join(self) -> None:
        request = messages.MeshJoin(
            self.name, self.identity.public_key, self.identity.ca.certificate.decode()
        )
        challenge = await self.connection.mesh_challenge(5)
        await self.connection.control.send(self.identity.prove_join(challenge, request))

    async def next(self, kind: type[messages.Message]) -> messages.Message:
        message = await asyncio.wait_for(self.inbox.get(), 5)
        assert isinstance(message, kind), message
        return message


def refused_as_expired(bed: Bed) -> float:
    registry = bed.relay.relay.metrics.registry
    value = registry.get_sample_value(
        "cloudbridge_relay_p2p_rejected_total", {"reason": "token_expired"}
    )
    return value or 0.0


def test_mesh_requests_are_refused_after_exp_until_a_refresh(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        bystander = MeshClient(await bed.connect(bed.token(permissions=MESH)), "server")
        await bystander.send_join()
        await bystander.next(messages.MeshPeers)
        token = bed.token(permissions=MESH, ttl=3)
        exp = exp_of(token)
        short = MeshClient(await bed.connect(token), "laptop")
        await short.send_join()
        listed = await short.next(messages.MeshPeers)
        assert isinstance(listed, messages.MeshPeers)
        (server,) = listed.peers
        await bystander.next(messages.MeshEvent)  # laptop joined
        await until(exp + 0.05)

        await short.connection.control.send(messages.Signal(server["peer_id"], "ice", {}))
        failed = await short.next(messages.SignalFailed)
        assert isinstance(failed, messages.SignalFailed)
        assert failed.code == TokenExpired.code
        assert await bystander.connection.ping(5) > 0  # after anything the relay sent it
        assert bystander.inbox.empty()  # the signal was not passed on
        await short.connection.control.send(messages.MeshRefresh())
        await short.send_join()
        assert await short.connection.ping(5) > 0  # answered after both refusals
        assert refused_as_expired(bed) == 3
        assert isinstance(short.connection.ended, TokenExpired)  # the errors the reader keeps
        assert short.inbox.empty()  # neither a peer list nor a new membership

        await short.connection.refresh(bed.token(permissions=MESH), 5)
        await short.send_join()
        assert isinstance(await short.next(messages.MeshPeers), messages.MeshPeers)
        assert refused_as_expired(bed) == 3
        for each in (short, bystander):
            await each.connection.aclose()

    # a long grace: the refusals are told apart from the end of the session
    run(tmp_path, scenario, token_expiry_grace="30s")


def test_a_refresh_with_a_fresh_token_keeps_the_session_alive(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        async with echo_server() as port:
            token = bed.token(ttl=3)
            exp = exp_of(token)
            session = await bed.connect(token)
            fresh = bed.token(ttl=3600)
            assert await session.refresh(fresh, 5) == pytest.approx(exp_of(fresh), abs=1)
            await until(exp + GRACE + 0.5)
            await tunnel_works(session, port)
            assert await session.ping(5) > 0
            assert expired_sessions(bed) == 0
            await session.aclose()

    run(tmp_path, scenario, token_expiry_grace=f"{GRACE:g}s")


def test_a_refresh_for_another_tenant_or_subject_is_refused(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        async with echo_server() as port:
            token = bed.token(ttl=3)
            exp = exp_of(token)
            session = await bed.connect(token)
            state = bed.relay.state
            other_subject = issue_token(
                state.signing_key,
                issuer=state.issuer,
                tenant="acme",
                subject="someone-else",
                permissions=BOTH,
                ttl=3600,
            )
            for stranger in (bed.token(tenant="globex"), other_subject):
                with pytest.raises(Unauthorized):
                    await session.refresh(stranger, 5)
            await tunnel_works(session, port)  # refused refreshes leave the session as it was
            ended_at = await ended_by_relay(session, GRACE + 5)
            assert ended_at < exp + GRACE + 1.5  # and it still ends with its own token
            await session.aclose()

    run(tmp_path, scenario, token_expiry_grace=f"{GRACE:g}s")


def test_the_client_refreshes_its_session_from_a_newer_token_in_its_file(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        token_file = tmp_path / "token"
        token = bed.token(ttl=4)
        exp = exp_of(token)
        token_file.write_text(token)
        config = bed.client_config(
            "", **{"auth.token_storage": "file", "auth.token_file": str(token_file)}
        )
        link = RelayLink(config, bed.plugins)
        await link.start()
        session_id = link.current.welcome.session_id
        token_file.write_text(bed.token(ttl=3600))  # as a renewal or a new login would
        await until(exp + GRACE + 0.5)
        assert link.current.welcome.session_id == session_id  # the same session, not a new one
        assert await link.current.ping(5) > 0
        assert expired_sessions(bed) == 0
        await link.aclose()

    run(tmp_path, scenario, token_expiry_grace=f"{GRACE:g}s")


def test_an_expired_token_with_no_newer_one_is_reported_with_a_hint(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        token = bed.token(ttl=2)
        exp = exp_of(token)
        link = RelayLink(bed.client_config(token), bed.plugins)
        await link.start()
        await until(exp + GRACE + 0.5)
        for _ in range(100):  # the link notices the end and tries once with the same token
            if link.state == "refused":
                break
            await asyncio.sleep(0.05)
        assert link.state == "refused"
        assert link.last_error is not None
        assert "expired" in link.last_error
        with pytest.raises(TokenExpired) as refused:
            await RelayLink(bed.client_config(token), bed.plugins).start()
        assert refused.value.hint is not None
        assert "log in" in refused.value.hint
        await link.aclose()

    run(tmp_path, scenario, token_expiry_grace=f"{GRACE:g}s")


def test_the_cli_reports_an_expired_token_with_exit_4_and_how_to_get_another(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        config = tmp_path / "client.yaml"
        port = bed.relay.listeners["tls"].port
        config.write_text(
            yaml.safe_dump(
                {
                    "relay": {
                        "host": "127.0.0.1",
                        "tls": {"ca_file": str(bed.state_dir / "ca.pem")},
                    },
                    "transport": {"mode": "tls", "tls": {"port": port}},
                }
            )
        )
        expired = bed.token(now=time.time() - 7200, ttl=3600)
        tunnel = await asyncio.create_subprocess_exec(
            *(BIN / "cloudbridge", "tunnel", "--config", str(config), "--local-port", "0"),
            *("--remote-host", "127.0.0.1", "--remote-port", "9"),
            stderr=asyncio.subprocess.PIPE,
            env=environment(CLOUDBRIDGE_TOKEN=expired),
        )
        _, stderr = await asyncio.wait_for(tunnel.communicate(), 30)
        assert tunnel.returncode == 4, stderr
        assert b"has expired" in stderr
        assert b"(token_expired)" in stderr
        assert b"log in" in stderr
        assert expired.encode() not in stderr  # the token itself is never shown
        bystander = await bed.connect()  # the relay goes on serving
        assert await bystander.ping(5) > 0
        await bystander.aclose()

    run(tmp_path, scenario)
