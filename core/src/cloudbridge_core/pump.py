"""Copy bytes both ways between a multiplexed stream and a TCP socket.

Each direction ends on its own (half-close propagates: EOF from one side becomes
``close_write`` / ``shutdown(SHUT_WR)`` on the other). An abnormal end is never passed on
as an EOF: an error on either side (a TCP RST, a reset stream, a lost session) or a
cancelled pump resets the stream and closes the socket with an RST, so the applications
at both ends see a broken transfer as broken, never as a short one that finished.

The TCP side reads into pooled buffers (see :class:`BufferPool`), and every write
waits for the other side (backpressure end to end), so a slow reader never makes memory
grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from cloudbridge_core.errors import TransportError
from cloudbridge_core.providers import Stream


@dataclass
class PumpResult:
    """Bytes moved each way: ``sent`` is TCP → stream, ``received`` is stream → TCP."""

    sent: int = 0
    received: int = 0
    error: str | None = None


def prepare(sock: socket.socket) -> socket.socket:
    """Non-blocking, and TCP_NODELAY: tunnelled request/response must not wait for Nagle."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class BufferPool:
    """Receive buffers shared by all connections, held only while bytes are in hand.

    An idle connection holds no buffer (it waits for readability first), so memory follows
    the traffic, not the number of connections; a busy one reuses buffers instead of
    allocating one per read.
    """

    def __init__(self, keep: int = 64) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep

    def acquire(self, size: int) -> bytearray:
        free = self._free.get(size)
        return free.pop() if free else bytearray(size)

    def release(self, buffer: bytearray) -> None:
        free = self._free.setdefault(len(buffer), [])
        if len(free) < self._keep:
            free.append(buffer)


POOL = BufferPool()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _receive(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int
) -> tuple[bytearray, int]:
    """A pooled buffer and how much of it one receive filled (0: EOF); the caller releases it.

    The socket is tried first, and waited for only when it has nothing: in a bulk transfer
    it almost always has, so no reader is registered per read. A loop without readiness
    callbacks (Windows' proactor) receives into the buffer as it waits instead.
    """
    while True:
        buffer = POOL.acquire(size)
        try:
            return buffer, sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            POOL.release(buffer)  # an idle connection holds no buffer while it waits
        except BaseException:
            POOL.release(buffer)
            raise
        try:
            await _readable(loop, sock)
        except NotImplementedError:
            buffer = POOL.acquire(size)
            try:
                return buffer, await loop.sock_recv_into(sock, buffer)
            except BaseException:
                POOL.release(buffer)
                raise


async def pump(
    stream: Stream,
    sock: socket.socket,
    *,
    buffer_size: int = 65536,
    result: PumpResult | None = None,
) -> PumpResult:
    """Run until both directions have ended, then close both; never raises for a peer's failure.

    ``result`` is updated as bytes move, so a caller sees the counts even if cancelled.
    """
    result = result if result is not None else PumpResult()
    loop = asyncio.get_running_loop()

    async def tcp_to_stream() -> None:
        while True:
            buffer, count = await _receive(loop, sock, buffer_size)
            try:
                if not count:
                    break
                await stream.write(memoryview(buffer)[:count])  # the stream copies what it keeps
            finally:
                POOL.release(buffer)
            result.sent += count
        await stream.close_write()

    async def stream_to_tcp() -> None:
        while data := await stream.read(buffer_size):
            await loop.sock_sendall(sock, data)
            result.received += len(data)
        with contextlib.suppress(OSError):  # the peer may already be gone entirely
            sock.shutdown(socket.SHUT_WR)

    tasks = [asyncio.create_task(tcp_to_stream()), asyncio.create_task(stream_to_tcp())]
    finished = False
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and (failure := task.exception()) is not None:
                raise failure
        finished = True
    except (OSError, TransportError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for task in tasks:
            task.cancel()
        # the caller may be cancelled meanwhile (its session ended along with the stream):
        # the socket is closed first, without waiting, so that it never outlives the pump
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if finished:
                sock.close()
                with contextlib.suppress(TransportError):
                    await stream.aclose()
            else:
                abort(sock)
                await stream.reset()
    return result


def abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: the peer learns the connection broke."""
    with contextlib.suppress(OSError):  # already reset by the peer, or not TCP
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
