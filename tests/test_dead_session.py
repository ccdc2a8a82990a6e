"""A relay that goes silent with its connections still open (black-holed) is found within
``health_check_interval + connect_timeout`` (issue 16): one measurement's pings share one
deadline, so the check that finds it waits one ``connect_timeout`` once, not once per ping.
The new session names the lost one, and the relay closes it at once. How long detection
takes is reported by the bench, not asserted here."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.errors import ConnectionTimeout, TransportClosed
from cloudbridge_core.testing.blackhole import Blackhole
from relaybed import Bed, run

pytestmark = pytest.mark.timeout(120)


def test_a_silent_relay_is_found_by_one_unanswered_ping_and_the_session_replaced(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        proxy = Blackhole(bed.relay.listeners["tls"].port)
        config = bed.client_config(
            bed.token(),
            **{
                "transport.tls.port": await proxy.start(),
                "transport.health_check_interval": "1s",
                "transport.connect_timeout": "2s",
                "metrics.enabled": False,
            },
        )
        metrics = ClientMetrics(["tls"])
        link = RelayLink(config, bed.plugins, metrics)
        await link.start()
        try:
            first = link.status()["session_id"]
            proxy.swallow_open_connections()
            for _ in range(200):
                if link.status()["session_id"] not in (first, None):
                    break
                await asyncio.sleep(0.05)
            assert link.status()["session_id"] not in (first, None), link.status()
            assert link.status()["state"] == "connected"
            # the check that found it sent one ping and waited one connect_timeout
            assert metrics.heartbeat_failures._value.get() == 1
            # the new hello named the silent session: the relay closed it at once, where it
            # would otherwise hold it beside the new one until its heartbeat timeout
            relay = bed.relay.relay
            assert relay.metrics.sessions_replaced._value.get() == 1
            for _ in range(100):
                if sum(relay.sessions_by_tenant.values()) == 1:
                    break
                await asyncio.sleep(0.02)
            assert dict(relay.sessions_by_tenant) == {"acme": 1}
        finally:
            await link.aclose()
            await proxy.aclose()

    run(tmp_path, scenario)


def test_a_relay_that_never_answers_the_hello_fails_the_connect_in_connect_timeout(
    tmp_path: Path,
) -> None:
    """The TLS handshake completes, the hello goes unanswered (a relay hung past its
    accept loop): the connect fails as a timeout, where it used to wait forever."""

    async def scenario(bed: Bed) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(bed.state_dir / "server.pem", bed.state_dir / "server.key")
        heard: list[bytes] = []

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heard.append(await reader.read(1))
            await reader.read()  # until the client gives up
            writer.close()

        server = await asyncio.start_server(mute, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ConnectionTimeout, match="no answer to its hello"):
                async with asyncio.timeout(30):  # a hang guard
                    await bed.connect(
                        **{"transport.tls.port": port, "transport.connect_timeout": "1s"}
                    )
            assert heard  # the hello was sent: the wait was for its answer
        finally:
            server.close()
            await server.wait_closed()

    run(tmp_path, scenario)


def test_a_lost_quic_session_is_reported_with_the_sessions_own_reason(tmp_path: Path) -> None:
    """What ended a QUIC session (the relay's close here; an ICMP port unreachable or a
    stateless reset after a crash) reaches the ping that finds it, and so the link's
    ``session_lost`` line: not only "the control stream has ended"."""

    async def scenario(bed: Bed) -> None:
        connection = await bed.connect()
        try:
            await connection.ping(5)
            await bed.relay.listeners["quic"].aclose()
            error = await first_failed_ping(connection)
            assert "control stream has ended: " in error.message
            assert error.message.endswith("the relay is stopping")
        finally:
            await connection.aclose()

    run(tmp_path, scenario, transport="quic")


async def first_failed_ping(connection: RelayConnection) -> TransportClosed:
    async with asyncio.timeout(10):  # a hang guard
        while True:
            try:
                await connection.ping(5)
            except TransportClosed as error:
                return error
            await asyncio.sleep(0.05)
