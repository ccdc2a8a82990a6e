"""A local TCP port forwarded to a port a peer exposes, over the peer session's best path
(``cloudbridge tunnel --remote-peer NAME``), or over the overlay when it is up on this host
and the peer has an overlay address: the kernel carries the bytes then (see
:mod:`cloudbridge_core.overlay.tcp`)."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from typing import Any

from cloudbridge_core.accept import accept_forever
from cloudbridge_core.client.opening import OpeningStream
from cloudbridge_core.client.tunnel import TunnelStatistics, sent_already
from cloudbridge_core.errors import AddressInUse, CloudBridgeError
from cloudbridge_core.log import get_logger
from cloudbridge_core.overlay.routes import routed_through
from cloudbridge_core.overlay.tcp import TcpStream
from cloudbridge_core.p2p.manager import ATTEMPT_TIMEOUT, PeerManager
from cloudbridge_core.p2p.setup import PeerTunnelSpec
from cloudbridge_core.pump import PumpResult, abort, prepare, pump

log = get_logger("p2p.tunnel")

#: each read of the application's connection, as a relayed tunnel's by default
BUFFER_SIZE = 65536
#: how long a connection to the peer's overlay address may take before the tunnel takes
#: the peer session instead, and how long it then keeps to the peer session
OVERLAY_CONNECT_TIMEOUT = 2.0
OVERLAY_RETRY = 60.0


class PeerTunnel:
    """``mesh`` may come with :meth:`start`: the port can be bound (:meth:`bind`) before
    the mesh is joined, so a taken one stops the command before anything connects."""

    def __init__(self, spec: PeerTunnelSpec, mesh: PeerManager | None = None) -> None:
        self.spec = spec
        self._joined = mesh
        self.statistics = TunnelStatistics()
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        #: when a connection over the overlay last failed (monotonic)
        self._overlay_failed_at = -OVERLAY_RETRY

    @property
    def port(self) -> int:
        assert self._listener is not None  # set by start()
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def _mesh(self) -> PeerManager:
        assert self._joined is not None  # accepting starts only with the mesh (start())
        return self._joined

    def bind(self) -> None:
        """Listen on the local port (connections wait in the backlog until :meth:`start`);
        raises ``AddressInUse`` when it is taken."""
        if self._listener is not None:
            return
        local = (self.spec.local_host, self.spec.local_port)
        try:
            listener = socket.create_server(local, backlog=1024)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise AddressInUse(
                f"{local[0]}:{local[1]} is already in use: the peer tunnel to"
                f" {self.spec.target} cannot listen there",
                hint=f"stop what listens on port {local[1]}, or choose another --local-port",
            ) from None
        listener.setblocking(False)
        self._listener = listener

    async def start(self, mesh: PeerManager | None = None) -> None:
        if mesh is not None:
            self._joined = mesh
        self.bind()
        assert self._listener is not None  # bound just now
        self._acceptor = asyncio.create_task(accept_forever(self._listener, self._accepted))

    def _accepted(self, client: socket.socket, _address: object) -> None:
        task = asyncio.create_task(self._carry(prepare(client)))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _carry(self, client: socket.socket) -> None:
        stats = self.statistics
        stats.total_connections += 1
        stats.active_connections += 1
        started = time.perf_counter()
        moved = PumpResult()
        pumped = False  # from then on the pump closes the socket, however it ends

        def accepted() -> None:
            stats.setup_seconds_total += time.perf_counter() - started

        try:
            # what the application has sent by now goes in the same record as the header
            first = sent_already(client, BUFFER_SIZE)
            stream = await self._open(first, accepted)
            moved.sent += len(first)
            pumped = True
            await pump(stream, client, buffer_size=BUFFER_SIZE, result=moved)
            if stream.refused is not None:
                raise stream.refused
            if moved.error:
                stats.errors += 1
        except (CloudBridgeError, OSError) as error:
            stats.errors += 1
            code = error.code if isinstance(error, CloudBridgeError) else "io_error"
            log.warning("peer_tunnel_failed", peer=self.spec.peer, code=code, reason=str(error))
        finally:
            if not pumped:  # never after the pump: a reset would drop an answer's unsent end
                abort(client)
            stats.bytes_sent += moved.sent
            stats.bytes_received += moved.received
            stats.active_connections -= 1

    async def _open(self, first: bytes, accepted: Callable[[], None]) -> OpeningStream | TcpStream:
        """A connection over the overlay when it is up and reaches the port, else a stream
        of the peer session (a port only the peer's loopback serves, say)."""
        address = self._overlay_address()
        if address is not None:
            try:
                stream = await TcpStream.connect(address, OVERLAY_CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as error:
                self._overlay_failed_at = time.monotonic()
                log.info("peer_tunnel_not_over_overlay", peer=self.spec.peer, reason=str(error))
            else:
                if first:
                    await stream.write(first)
                accepted()
                return stream
        return await self._mesh.open_at_once(
            self.spec.peer, self.spec.remote_port, first, accepted, ATTEMPT_TIMEOUT
        )

    def _overlay_address(self) -> tuple[str, int] | None:
        """The peer's overlay address and the port, when this host routes it through an
        interface (the overlay is up here) and it did not fail lately."""
        if time.monotonic() - self._overlay_failed_at < OVERLAY_RETRY:
            return None
        try:
            overlay_ip = self._mesh.find(self.spec.peer).info.overlay_ip
        except CloudBridgeError:
            return None
        if not overlay_ip or routed_through(overlay_ip) is None:
            return None
        return overlay_ip, self.spec.remote_port

    def document(self) -> dict[str, Any]:
        return {
            "name": None,
            "local": f"{self.spec.local_host}:{self.port}",
            "target": self.spec.target,
            "transport": "p2p",
            "statistics": self.statistics.to_dict(),
        }

    async def aclose(self, drain: float = 0.0) -> None:
        if self._listener is None:
            return
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
            self._acceptor = None
        self._listener.close()
        self._listener = None
        if drain and self._handlers:
            await asyncio.wait(set(self._handlers), timeout=drain)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
