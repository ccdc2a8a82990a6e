"""The relay hands each mesh member short-lived TURN credentials for its tenant
(``server.turn``) and renews them while the session lasts; mesh peers with no usable static
``p2p.ice.turn_servers`` reach each other over a real coturn with them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.log import configure_logging
from cloudbridge_core.p2p import membership as membership_module
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.p2p.metrics import P2PMetrics
from cloudbridge_core.plugins import PluginSelection, load_plugins
from cloudbridge_core.protocol import messages
from cloudbridge_core.relay.turn import TurnIssuer
from cloudbridge_core.testing.waiting import until
from coturn import coturn_with_secret
from prometheus_client import CollectorRegistry
from relaybed import BOTH, Bed, echo_server, run
from test_p2p_loopback import sha256_round_trip

pytestmark = pytest.mark.timeout(90)
MESH = [*BOTH, "p2p:mesh"]
SECRET = "shared-with-coturn-only"


def turn_section(tmp_path: Path, port: int) -> dict[str, Any]:
    secret_file = tmp_path / "turn.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    return {"secret_file": str(secret_file), "urls": [f"turn:127.0.0.1:{port}"]}


def issued(bed: Bed) -> float:
    registry = bed.relay.relay.metrics.registry
    return registry.get_sample_value("cloudbridge_relay_turn_credentials_issued_total") or 0.0


@asynccontextmanager
async def turn_member(
    bed: Bed, name: str, turn_servers: list[dict[str, str]], expose: tuple[int, ...] = ()
) -> AsyncIterator[tuple[PeerManager, RelayLink]]:
    """A mesh member whose only NAT strategy is ``turn`` (no ICE host candidates and no TCP
    path, which would meet directly on this machine; no DERP), with ``turn_servers`` as
    static ones."""
    config = bed.client_config(
        bed.token(permissions=MESH),
        **{
            "p2p.name": name,
            "p2p.expose": list(expose),
            "p2p.heartbeat_interval": "1s",
            "p2p.ice.turn_servers": turn_servers,
        },
    )
    plugins = load_plugins(PluginSelection(deny=frozenset({"ice", "derp"})))
    link = RelayLink(config, plugins)
    await link.start()
    identity, metrics = DeviceIdentity.create(), P2PMetrics(CollectorRegistry())
    manager = PeerManager(
        config, plugins, link, identity, set(expose), "p2p-first", metrics, tcp=False
    )
    try:
        await manager.start()
        yield manager, link
    finally:
        await manager.aclose()
        await link.aclose()


def test_peers_without_usable_static_turn_servers_meet_over_relay_issued_credentials(
    tmp_path: Path,
) -> None:
    log = tmp_path / "cloudbridge.log"
    seen: list[str] = []

    async def scenario(bed: Bed) -> None:
        async with (
            echo_server() as echo_port,
            turn_member(bed, "laptop", []) as (laptop, laptop_link),
            # static credentials coturn refuses: only the relay's can give a TURN path
            turn_member(bed, "server", [wrong], expose=(echo_port,)) as (_, server_link),
        ):
            await until(lambda: [p["path"] for p in laptop.status()] == ["turn"])
            sent, echoed = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
            assert sent == echoed
            for link in (laptop_link, server_link):
                credentials = link.current.turn_credentials
                assert credentials is not None
                assert credentials.username.endswith(":acme")
                assert credentials.urls == [f"turn:127.0.0.1:{coturn}"]
                seen.append(credentials.credential)
            assert issued(bed) >= 2

    configure_logging(level="debug", fmt="json", output=str(log))
    try:
        with coturn_with_secret(tmp_path, SECRET) as coturn:
            wrong = {"url": f"turn:127.0.0.1:{coturn}", "username": "x", "credential": "wrong"}
            run(tmp_path, scenario, turn=turn_section(tmp_path, coturn))
    finally:
        configure_logging()
    written = log.read_text()
    assert "turn_credentials" in written  # the client logged their arrival...
    assert seen
    assert not any(credential in written for credential in seen)  # ...never the credential
    assert SECRET not in written


def test_the_relay_renews_the_credentials_while_the_session_lasts(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        ttl = 4.0  # below the schema's 1m: renewals every 2 s keep the test short
        bed.relay.relay.turn = TurnIssuer(SECRET.encode(), ("turn:127.0.0.1:3478",), ttl)
        config = bed.client_config(bed.token(permissions=MESH), **{"p2p.name": "laptop"})
        link = RelayLink(config, bed.plugins)
        await link.start()
        connection = link.current
        held_at_join: list[messages.TurnCredentials | None] = []

        def on_peers(_: object) -> None:
            held_at_join.append(connection.turn_credentials)

        membership = Membership(link, DeviceIdentity.create(), "laptop", on_peers, lambda *_: None)
        await membership.start(5)
        first = held_at_join[0]
        assert first is not None  # sent before the peer list that answers the join
        assert first.username.endswith(":acme")
        renewals = [first]
        while len(renewals) < 3:
            previous = renewals[-1]
            await until(
                lambda held=previous: connection.turn_credentials is not held, within=ttl * 2
            )
            assert time.time() < previous.expires_at  # renewed before the last ones expired
            current = connection.turn_credentials
            assert current is not None
            assert current.expires_at > previous.expires_at
            assert current.credential != previous.credential
            renewals.append(current)
            assert await membership.turn_credentials() == current
        assert issued(bed) >= 3

        await membership.aclose()
        await link.aclose()
        await until(lambda: not bed.relay.relay.sessions_by_tenant)
        await until(lambda: not renewing())  # the renewal ended with the session

    run(tmp_path, scenario)


def renewing() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "Relay._renew_turn"
    ]


def test_a_relay_without_server_turn_gives_none_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a wait for credentials this relay never sends would outlast the test's own deadline
    monkeypatch.setattr(membership_module, "TURN_CREDENTIALS_WAIT", 3600.0)

    async def scenario(bed: Bed) -> None:
        config = bed.client_config(bed.token(permissions=MESH), **{"p2p.name": "laptop"})
        link = RelayLink(config, bed.plugins)
        await link.start()
        membership = Membership(
            link, DeviceIdentity.create(), "laptop", lambda _: None, lambda *_: None
        )
        await membership.start(5)
        assert await asyncio.wait_for(membership.turn_credentials(), 5) is None
        assert link.current.turn_credentials is None
        assert issued(bed) == 0
        await membership.aclose()
        await link.aclose()

    run(tmp_path, scenario)
