"""Where the overlay's packets to a peer pass through Python: a loopback UDP socket per
peer that the overlay takes as that peer's endpoint. What the overlay sends to it goes to
the peer over the peer session's current path (TURN, DERP, or a direct path whose packets
the kernel does not route to the overlay itself); what comes from the peer is handed to
the overlay's own port from this socket, so the overlay answers here again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"


class PeerProxy(asyncio.DatagramProtocol):
    def __init__(self, send_to_peer: Callable[[bytes], None], overlay_port: int) -> None:
        self._send_to_peer = send_to_peer
        self._overlay = (LOOPBACK, overlay_port)
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, send_to_peer: Callable[[bytes], None], overlay_port: int) -> PeerProxy:
        loop = asyncio.get_running_loop()
        _, proxy = await loop.create_datagram_endpoint(
            lambda: cls(send_to_peer, overlay_port), local_addr=(LOOPBACK, 0)
        )
        return proxy

    @property
    def endpoint(self) -> tuple[str, int]:
        assert self._transport is not None  # set once the endpoint is open
        address: tuple[str, int] = self._transport.get_extra_info("sockname")
        return address

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr == self._overlay:  # nothing else on the host may speak for the peer
            self._send_to_peer(data)

    def from_peer(self, packet: bytes) -> None:
        if self._transport is not None:
            self._transport.sendto(packet, self._overlay)

    def error_received(self, exc: Exception) -> None:
        """The overlay's port refused a packet (it restarts): the next ones get through."""

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
