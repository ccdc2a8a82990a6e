"""performance.max_concurrent_tunnels: the client refuses connections beyond the limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.client.race import connect
from cloudbridge_core.client.tunnel import ConnectionLimit, Tunnel, TunnelSpec
from cloudbridge_core.client.tunnel_set import TunnelSet

from tests.relaybed import Bed, echo_server, round_trip, run


async def refused_at_once(port: int) -> bool:
    """Whether the tunnel resets a new connection before anything is sent (a refusal: a
    failure, never an empty answer that looks like one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.read()
    except ConnectionResetError:
        return True
    finally:
        writer.close()
    return False


def test_the_limit_counts_connections_across_tunnels_and_refuses_the_next(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        config = bed.client_config(bed.token(), **{"performance.max_concurrent_tunnels": 1})
        connection = await connect(config, bed.plugins)
        limit = ConnectionLimit(config.settings.performance.max_concurrent_tunnels)
        async with echo_server() as target:
            first, second = (
                Tunnel(TunnelSpec(0, "127.0.0.1", target), connection, limit=limit)
                for _ in range(2)
            )
            await first.start()
            await second.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
            writer.write(b"held open")
            assert await reader.readexactly(9) == b"held open"
            assert await refused_at_once(second.port)
            assert second.statistics.errors == 1
            assert limit.active == 1
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await first.aclose(drain=5.0)  # waits for its connection's end, which frees room
            assert limit.active == 0
            assert await round_trip(second.port, b"room again") == b"room again"
            await second.aclose()
        await connection.aclose()

    run(tmp_path, scenario)


def test_a_reload_changes_the_limit_for_the_next_connections(tmp_path: Path) -> None:
    async def scenario(bed: Bed) -> None:
        config = bed.client_config(bed.token(), **{"performance.max_concurrent_tunnels": 1})
        connection = await connect(config, bed.plugins)
        limit = ConnectionLimit(config.settings.performance.max_concurrent_tunnels)
        listed: list[Tunnel] = []
        tunnels = TunnelSet(connection, 65536, ClientMetrics(["tls"]), listed, limit)
        async with echo_server() as target:
            await tunnels.start([TunnelSpec(0, "127.0.0.1", target, name="echo")])
            reader, writer = await asyncio.open_connection("127.0.0.1", listed[0].port)
            writer.write(b"held open")
            assert await reader.readexactly(9) == b"held open"
            assert await refused_at_once(listed[0].port)
            raised = bed.client_config(
                bed.token(),
                **{
                    "performance.max_concurrent_tunnels": 2,
                    "tunnels": [
                        {
                            "name": "echo",
                            "local_port": listed[0].port,
                            "remote_host": "127.0.0.1",
                            "remote_port": target,
                        }
                    ],
                },
            )
            assert "performance.max_concurrent_tunnels" in await tunnels.follow(raised)
            assert await round_trip(listed[0].port, b"room now") == b"room now"
            writer.close()
            await tunnels.aclose(0.0)
        await connection.aclose()

    run(tmp_path, scenario)
