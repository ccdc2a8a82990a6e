"""The egress policy's holes, probed as a tenant would: tunnels through an in-process relay
on loopback. Names come from the real resolver (``localhost``) or from a resolver the test
puts in the policy; no packet leaves loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.errors import EgressDenied
from relaybed import Bed, echo_server, relay_bed, run

pytestmark = pytest.mark.timeout(120)


async def echoes(connection: RelayConnection, port: int) -> None:
    """The session still tunnels to an allowed target."""
    stream, _ = await connection.open_tunnel(f"127.0.0.1:{port}")
    await stream.write(b"still served")
    await stream.close_write()
    assert await stream.read() == b"still served"


@asynccontextmanager
async def counting_server() -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback server that only counts the connections it is given."""
    accepted: list[int] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


def test_a_tenant_cannot_tunnel_into_the_relay_itself(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        tenant = await bed.connect()
        ports = [listener.port for listener in bed.relay.listeners.values()]
        for port in ports:
            for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433", "127.1"]:
                with pytest.raises(EgressDenied, match="the relay itself"):
                    await tenant.open_tunnel(f"{host}:{port}")
        async with echo_server() as target:  # --dev still opens loopback, and all is served
            await echoes(tenant, target)
            other = await bed.connect(bed.token(tenant="globex"))
            await echoes(other, target)
        await other.aclose()
        await tenant.aclose()

    run(tmp_path, scenario)


def test_a_host_rule_does_not_open_loopback(tmp_path: Path) -> None:
    async def main() -> None:
        allow = ["localhost", "*.localhost", "127.0.0.0/8"]
        async with (
            relay_bed(tmp_path, dev=False, egress={"allow": allow}) as bed,
            counting_server() as (port, accepted),
        ):
            tenant = await bed.connect()
            this_host = "0.0.0.0"  # noqa: S104 - a tunnel target, not a bind
            for host in ["localhost", "LOCALHOST.", "127.0.0.1", this_host]:
                with pytest.raises(EgressDenied, match=r"loopback|this host"):
                    await tenant.open_tunnel(f"{host}:{port}")
            assert accepted == []
            other = await bed.connect(bed.token(tenant="globex"))
            with pytest.raises(EgressDenied, match="loopback"):
                await other.open_tunnel(f"localhost:{port}")
            await other.aclose()
            await tenant.aclose()

    asyncio.run(main())


def test_a_name_with_an_allowed_and_a_loopback_address_is_not_dialled(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            relay_bed(tmp_path, dev=False, egress={"allow": ["*.test", "10.20.0.0/16"]}) as bed,
            counting_server() as (port, accepted),
        ):
            answers = [("127.0.0.1", port), ("10.20.0.1", port)]

            async def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
                assert host == "two-faced.test"
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in answers]

            policy = bed.relay.relay.egress
            bed.relay.relay.egress = replace(policy, resolver=resolver)
            tenant = await bed.connect()
            for _ in range(2):
                with pytest.raises(EgressDenied, match="loopback"):
                    await tenant.open_tunnel(f"two-faced.test:{port}")
                answers.reverse()
            assert accepted == []
            await tenant.aclose()

    asyncio.run(main())
