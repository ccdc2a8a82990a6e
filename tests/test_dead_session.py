"""A relay that goes silent with its connections still open (black-holed) is found within
``health_check_interval + connect_timeout`` (issue 16): one measurement's pings share one
deadline, so the check that finds it waits one ``connect_timeout`` once, not once per ping.
How long detection takes is reported by the bench, not asserted here."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.metrics import ClientMetrics
from relaybed import Bed, run

pytestmark = pytest.mark.timeout(120)


class Blackhole:
    """A TCP proxy to the relay that can stop carrying the connections it holds (what it
    gets from them is swallowed, nothing is closed) while new connections pass."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.generation = 0
        self._never = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def swallow_open_connections(self) -> None:
        self.generation += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        generation = self.generation
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._copy(source, sink, generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _copy(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, generation: int
    ) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if generation != self.generation:
                        await self._never.wait()
                    sink.write(data)
                    await sink.drain()
        finally:
            sink.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()


def test_a_silent_relay_is_found_by_one_unanswered_ping_and_replaced(tmp_path: Path) -> None:
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
        finally:
            await link.aclose()
            await proxy.aclose()

    run(tmp_path, scenario)
