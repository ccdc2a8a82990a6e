"""Peers' raw connections on the relay's TLS port, told apart from TLS clients by their
first byte (the preamble of :mod:`cloudbridge_core.protocol.preamble`).

The listener peeks (``MSG_PEEK``) once the connection is readable, so a TLS client's bytes
stay in the kernel for the TLS handshake; only a connection whose first byte starts the
preamble has its bytes read, and never more than the preamble's. All of it happens
within the connection's pre-auth deadline.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from cloudbridge_core.protocol.preamble import PREAMBLE_SIZE, may_be_preamble


class RawSplices(Protocol):
    """What joins peers' raw connections (the relay's ticket desk, ``relay/tickets.py``)."""

    def listening(self, port: int) -> None:
        """The TLS listener that hands raw connections over listens on ``port``."""

    def refused(self, reason: str) -> None:
        """A raw connection was dropped before its ticket was looked at (counted)."""

    async def redeem(self, ticket: bytes, connection: socket.socket) -> None:
        """Take ``connection`` (its preamble read) and splice it to its partner's, or
        close it (an unknown, expired or used ticket); returns when it is closed."""


def can_sniff(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` can wait for readability without reading (Windows' proactor has
    no readiness callbacks: its listeners take TLS only)."""
    proactor = getattr(asyncio, "ProactorEventLoop", None)
    return proactor is None or not isinstance(loop, proactor)


async def sniff(connection: socket.socket, within: float) -> bytes | None:
    """The preamble's bytes, read off the connection (fewer when it ended first), or None
    for any other connection, which is left unread; all within ``within`` seconds.

    Raises:
        ConnectionAbortedError: not a byte within ``within``, as asyncio's TLS handshake
            deadline ends a silent TLS client (not counted as a pre-auth expiry).
        TimeoutError: the preamble started and did not end within ``within``.
        OSError: the connection failed before its first byte.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    try:
        async with asyncio.timeout_at(deadline):
            first = await _peek(loop, connection)
    except TimeoutError:
        raise ConnectionAbortedError("no byte within the handshake deadline") from None
    if not first or not may_be_preamble(first):
        return None  # TLS, or anything else: the TLS handshake judges it, as before
    data = b""
    async with asyncio.timeout_at(deadline):
        while len(data) < PREAMBLE_SIZE:
            chunk = await loop.sock_recv(connection, PREAMBLE_SIZE - len(data))
            if not chunk:
                break
            data += chunk
    return data


async def _peek(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> bytes:
    while True:
        try:
            return connection.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, connection)


async def _readable(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(connection.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(connection.fileno())
