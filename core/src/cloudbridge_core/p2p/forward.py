"""A local TCP port forwarded to a port a peer exposes, over the peer session's best path
(``cloudbridge tunnel --remote-peer NAME``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cloudbridge_core.client.tunnel import TunnelStatistics
from cloudbridge_core.errors import CloudBridgeError
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.manager import ATTEMPT_TIMEOUT, PeerManager
from cloudbridge_core.p2p.setup import PeerTunnelSpec
from cloudbridge_core.p2p.streams import pump

log = get_logger("p2p.tunnel")


class PeerTunnel:
    def __init__(self, spec: PeerTunnelSpec, mesh: PeerManager) -> None:
        self.spec = spec
        self._mesh = mesh
        self.statistics = TunnelStatistics()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None  # set by start()
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accepted, self.spec.local_host, self.spec.local_port
        )

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        stats = self.statistics
        stats.total_connections += 1
        stats.active_connections += 1
        started = time.perf_counter()
        try:
            try:
                remote = await self._mesh.open(
                    self.spec.peer, self.spec.remote_port, ATTEMPT_TIMEOUT
                )
            except CloudBridgeError as error:
                stats.errors += 1
                log.warning(
                    "peer_tunnel_failed", peer=self.spec.peer, code=error.code, reason=error.message
                )
                writer.close()
                return
            stats.setup_seconds_total += time.perf_counter() - started
            sent, received = await pump(reader, writer, *remote)
            stats.bytes_sent += sent
            stats.bytes_received += received
        finally:
            stats.active_connections -= 1
            self._handlers.discard(task)

    def document(self) -> dict[str, Any]:
        return {
            "name": None,
            "local": f"{self.spec.local_host}:{self.port}",
            "target": self.spec.target,
            "transport": "p2p",
            "statistics": self.statistics.to_dict(),
        }

    async def aclose(self, drain: float = 0.0) -> None:
        if self._server is None:
            return
        self._server.close()
        if drain and self._handlers:
            await asyncio.wait(set(self._handlers), timeout=drain)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
