"""Local TCP listeners whose connections are carried through the relay to a target."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from cloudbridge_core.accept import accept_forever
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.errors import CloudBridgeError, LimitExceeded
from cloudbridge_core.log import debug_on, get_logger
from cloudbridge_core.pump import PumpResult, abort, prepare, pump
from cloudbridge_core.settings import TunnelSettings

log = get_logger("tunnel")
_debug = debug_on("tunnel")


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


class ConnectionLimit:
    """``performance.max_concurrent_tunnels``: tunnelled connections open at once, counted
    across every tunnel of this client. ``maximum`` may change while connections are open
    (a reload); those above a lowered maximum finish, new ones are refused until there is room."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.active = 0

    def acquire(self) -> None:
        """Count one more connection; ``LimitExceeded`` when the limit is reached."""
        if self.active >= self.maximum:
            raise LimitExceeded(
                f"{self.active} tunnelled connections are open, the most"
                f" performance.max_concurrent_tunnels allows: connection refused"
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def sent_already(client: socket.socket, size: int) -> bytes:
    """What the application has sent by now (often its whole request): it goes in the same
    record as the stream's ``open`` (a peer tunnel's ``peer_open``). Raises ``OSError``
    when the connection was reset."""
    try:
        return client.recv(size)
    except (BlockingIOError, InterruptedError):
        return b""


class ConnectionSource(Protocol):
    """A relay connection (or a link that moves between them), held per tunnelled connection."""

    def use(self) -> AbstractAsyncContextManager[RelayConnection]: ...


@dataclass(frozen=True)
class TunnelSpec:
    local_port: int
    remote_host: str
    remote_port: int
    local_host: str = "127.0.0.1"
    name: str | None = None

    @classmethod
    def of(cls, settings: TunnelSettings) -> TunnelSpec:
        """The spec of one ``tunnels:`` entry."""
        return cls(
            settings.local_port,
            settings.remote_host,
            settings.remote_port,
            settings.local_host,
            settings.name,
        )

    @property
    def key(self) -> str:
        """What a reload knows the tunnel by: its name, by default ``tunnel-<local_port>``."""
        return self.name or f"tunnel-{self.local_port}"

    @property
    def local(self) -> str:
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"{host}:{self.local_port}"

    @property
    def target(self) -> str:
        host = f"[{self.remote_host}]" if ":" in self.remote_host else self.remote_host
        return f"{host}:{self.remote_port}"


class Tunnel:
    """One local listener; each accepted connection becomes one stream to the target."""

    def __init__(
        self,
        spec: TunnelSpec,
        connection: ConnectionSource,
        buffer_size: int = 65536,
        metrics: ClientMetrics | None = None,
        limit: ConnectionLimit | None = None,
    ) -> None:
        self.spec = spec
        self._metrics = metrics
        self._limit = limit
        self.statistics = TunnelStatistics()
        self._connection = connection
        #: copy buffer of connections accepted from now on (``performance.buffer_size``)
        self.buffer_size = buffer_size
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._port is not None  # set by start()
        return self._port

    @property
    def listening(self) -> bool:
        return self._listener is not None

    async def start(self) -> None:
        """Listen; raises ``OSError`` when the local address cannot be had."""
        listener = socket.create_server((self.spec.local_host, self.spec.local_port), backlog=1024)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._acceptor = asyncio.create_task(accept_forever(listener, self._accepted))

    def retarget(self, spec: TunnelSpec) -> None:
        """Carry connections accepted from now on to ``spec``'s target; the listener and
        the connections already open stay as they are."""
        self.spec = spec

    async def stop_listening(self) -> None:
        """Close the listener; connections already open go on until they end."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accepted(self, client: socket.socket, _address: object) -> None:
        task = asyncio.create_task(self._carry(prepare(client)))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _carry(self, client: socket.socket) -> None:
        spec, buffer_size = self.spec, self.buffer_size  # a reload changes them for the next
        stats = self.statistics
        stats.total_connections += 1
        stats.active_connections += 1
        started = time.perf_counter()
        moved = PumpResult()
        counted = False
        pumped = False  # from then on the pump closes the socket, however it ends
        try:
            if self._limit is not None:
                self._limit.acquire()
                counted = True
            async with self._connection.use() as connection:

                def accepted() -> None:
                    setup = time.perf_counter() - started
                    stats.setup_seconds_total += setup
                    if self._metrics is not None:
                        self._metrics.setup_latency.observe(setup)
                    if _debug():
                        log.debug(
                            "tunnel_opened",
                            target=spec.target,
                            transport=connection.transport,
                            session_id=connection.welcome.session_id,
                            latency_ms=round(setup * 1000, 2),
                        )

                try:
                    first = sent_already(client, buffer_size)
                except OSError as exc:  # reset before anything was carried
                    moved.error = f"{type(exc).__name__}: {exc}"
                    stats.errors += 1
                    return
                stream = await connection.open_tunnel_at_once(spec.target, first, accepted)
                moved.sent += len(first)
                pumped = True
                await pump(stream, client, buffer_size=buffer_size, result=moved)
                if stream.refused is not None:
                    raise stream.refused
                if moved.error:
                    stats.errors += 1
        except CloudBridgeError as error:
            stats.errors += 1
            if self._metrics is not None:
                self._metrics.errors.labels(error.code).inc()
            log.warning("tunnel_refused", target=spec.target, code=error.code, reason=error.message)
        finally:
            if counted and self._limit is not None:
                self._limit.release()
            if not pumped:
                # refused, or failed on the way: the application learns of it by a reset.
                # Never after the pump: its transport may still be sending the answer's
                # end, which a reset would drop
                abort(client)
            stats.bytes_sent += moved.sent
            stats.bytes_received += moved.received
            stats.active_connections -= 1

    async def aclose(self, drain: float = 0.0) -> None:
        """Stop accepting; give open connections up to ``drain`` seconds, then cut them."""
        await self.stop_listening()
        if drain and self._handlers:
            await asyncio.wait(set(self._handlers), timeout=drain)
        tasks = list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
