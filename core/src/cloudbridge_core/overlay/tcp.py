"""A TCP connection as a :class:`~cloudbridge_core.providers.Stream`: what a peer tunnel
(``cloudbridge tunnel --remote-peer``) carries its connections over when the overlay is
up on this host and the peer has an overlay address, instead of a stream of the peer
session. The kernel then moves the bytes (WireGuard over the path the mesh found); a
reset stays a reset and an EOF an EOF, as on the peer session's streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from cloudbridge_core.errors import StreamAborted


class TcpStream:
    #: what a stream opened through the relay or a peer session may carry: its refusal
    refused = None

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int], within: float) -> TcpStream:
        """Raises ``OSError`` or ``TimeoutError`` when nothing answers there in time."""
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def read(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except ConnectionError as error:
            raise StreamAborted(f"the peer's connection broke: {error}") from error

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._writer.write(bytes(data))
            await self._writer.drain()
        except ConnectionError as error:
            raise StreamAborted(f"the peer's connection broke: {error}") from error

    async def close_write(self) -> None:
        if not self._writer.is_closing():
            with contextlib.suppress(OSError):
                self._writer.write_eof()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def reset(self) -> None:
        sock = self._writer.get_extra_info("socket")
        if sock is not None:  # an RST, not a FIN: the peer's application learns it broke
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
