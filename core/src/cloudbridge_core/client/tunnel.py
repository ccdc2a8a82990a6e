"""Local TCP listeners whose connections are carried through the relay to a target."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.errors import CloudBridgeError
from cloudbridge_core.log import get_logger
from cloudbridge_core.pump import PumpResult, pump, tune

log = get_logger("tunnel")


@dataclass
class TunnelStatistics:
    """The seed's TunnelStatistics: connections, bytes each way, errors, latency."""

    total_connections: int = 0
    active_connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    errors: int = 0
    setup_seconds_total: float = 0.0

    @property
    def average_latency_seconds(self) -> float:
        opened = self.total_connections - self.errors
        return self.setup_seconds_total / opened if opened > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["setup_seconds_total"]
        return {**data, "average_latency_seconds": round(self.average_latency_seconds, 6)}


@dataclass(frozen=True)
class TunnelSpec:
    local_port: int
    remote_host: str
    remote_port: int
    local_host: str = "127.0.0.1"
    name: str | None = None

    @property
    def target(self) -> str:
        host = f"[{self.remote_host}]" if ":" in self.remote_host else self.remote_host
        return f"{host}:{self.remote_port}"


class Tunnel:
    def __init__(
        self, spec: TunnelSpec, connection: RelayConnection, buffer_size: int = 65536
    ) -> None:
        self.spec = spec
        self.statistics = TunnelStatistics()
        self._connection = connection
        self._buffer_size = buffer_size
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

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
        if task is not None:
            self._handlers.add(task)
        stats = self.statistics
        stats.total_connections += 1
        stats.active_connections += 1
        started = time.perf_counter()
        moved = PumpResult()
        try:
            tune(writer)
            try:
                stream, early = await self._connection.open_tunnel(self.spec.target)
            except CloudBridgeError as error:
                stats.errors += 1
                log.warning(
                    "tunnel_refused", target=self.spec.target, code=error.code, reason=error.message
                )
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            stats.setup_seconds_total += time.perf_counter() - started
            if early:
                writer.write(early)
            await pump(stream, reader, writer, buffer_size=self._buffer_size, result=moved)
            if moved.error:
                stats.errors += 1
        except asyncio.CancelledError:
            # the tunnel is closing; ending quietly keeps asyncio from logging the callback
            return
        finally:
            stats.bytes_sent += moved.sent
            stats.bytes_received += moved.received
            stats.active_connections -= 1
            if task is not None:
                self._handlers.discard(task)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
