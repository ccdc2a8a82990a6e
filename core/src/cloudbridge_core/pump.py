"""Copy bytes both ways between a multiplexed stream and a TCP socket.

Each direction ends on its own (half-close propagates: EOF from one side becomes
``close_write`` / ``shutdown(SHUT_WR)`` on the other). An abnormal end is never passed on
as an EOF: an error on either side (a TCP RST, a reset stream, a lost session) or a
cancelled pump resets the stream and closes the socket with an RST, so the applications
at both ends see a broken transfer as broken, never as a short one that finished.

The TCP side reads into pooled buffers (see :class:`BufferPool`), and every write
waits for the other side (backpressure end to end), so a slow reader never makes memory
grow.

A stream that can deliver to a sink and send at once (:class:`DirectStream`: the core
multiplexer over TLS) is pumped without tasks: the socket becomes an asyncio transport
whose protocol (:class:`_Bridge`) hands what it reads straight to the stream, and the
stream hands what the peer sends straight to the transport, both in the event loop's
callbacks. Backpressure holds there too: the socket is not read while the stream's window
or the session's pipe is full, and the peer gets no window credit while the socket's
send buffer is full. Any other stream is pumped by two tasks. Both run on every asyncio
loop (Windows' proactor included: transports, no readiness callbacks needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

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


def keep_alive(sock: Any, options: Mapping[str, int]) -> None:
    """TCP keepalive on ``sock`` with ``options`` (``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``,
    ``TCP_KEEPCNT``, ``TCP_USER_TIMEOUT`` by name): a peer gone without a word (its host
    lost, a NAT's mapping dropped) is noticed. Options the platform lacks are left out."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in options.items():
        option = getattr(socket, name, None)
        if option is not None:  # Linux has all; others some
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def connect(sock: socket.socket, address: tuple[object, ...]) -> None:
    """``loop.sock_connect`` for an address already resolved, without resolving it again.

    uvloop's ``sock_connect`` passes every address, an IP literal too, to ``getaddrinfo``
    in its thread pool first: a thread hop and an extra loop turn per connection. A loop
    without readiness callbacks (Windows' proactor) connects its own way.

    Raises:
        OSError: the connection failed (refused, unreachable).
    """
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[None] = loop.create_future()
    try:
        loop.add_writer(sock.fileno(), _settle, connected)
    except NotImplementedError:
        await loop.sock_connect(sock, address)
        return
    try:
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass
        await connected
    finally:
        loop.remove_writer(sock.fileno())
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


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


class StreamSink(Protocol):
    """What a :class:`DirectStream` delivers to once attached, instead of buffering for a
    reader: called as the stream's session handles the peer's frames."""

    def deliver(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def fail(self, error: Exception) -> None: ...

    def window_opened(self) -> None: ...


class DirectStream(Stream, Protocol):
    """A stream that delivers to a sink and sends without waiting (see the module)."""

    @property
    def direct(self) -> bool: ...

    def attach(self, sink: StreamSink) -> None: ...

    def send_now(self, data: bytes | bytearray | memoryview) -> int: ...

    def consume(self, count: int) -> None: ...

    def when_writable(self, callback: Callable[[], None]) -> bool: ...

    def close_write_now(self) -> None: ...

    def reset_now(self) -> None: ...


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
    if getattr(stream, "direct", False) is True:
        return await _pump_direct(cast(DirectStream, stream), sock, result)
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


async def pump_dialled(
    stream: DirectStream,
    address: tuple[Any, ...],
    *,
    first: bytes,
    connected: Callable[[], None],
    connect_within: float,
    result: PumpResult,
) -> PumpResult:
    """Connect to ``address`` (an IP address and port, no scope id) and pump between the
    connection and ``stream`` as :func:`pump` does.

    The loop connects with the pump's protocol in place: uvloop creates the socket
    non-blocking and with TCP_NODELAY and connects it in C, without a Python socket, a
    wait for writability and a second wrapping of the connected socket (about ten
    syscalls and a loop turn less than :func:`connect` then :func:`pump`). Once connected,
    before anything is read from it, ``first`` is written to the connection and
    ``connected`` called (the relay accepts its tunnel there, so the accept goes out
    before any of the target's bytes).

    Raises:
        OSError: the connection failed; nothing was written nor ``connected`` called.
        TimeoutError: not connected within ``connect_within`` seconds; likewise.
    """
    loop = asyncio.get_running_loop()
    bridge = _Bridge(stream, None, result, loop.create_future(), first, connected)

    async def dial() -> None:
        try:
            async with asyncio.timeout(connect_within):
                await loop.create_connection(lambda: bridge, address[0], address[1])
        except (OSError, TimeoutError) as exc:
            if not bridge.connected:
                raise
            bridge.fail(exc)  # connected as the deadline passed: the accept is out already

    return await _bridged(stream, bridge, dial(), result)


async def _pump_direct(stream: DirectStream, sock: socket.socket, result: PumpResult) -> PumpResult:
    loop = asyncio.get_running_loop()
    bridge = _Bridge(stream, sock, result, loop.create_future())

    async def wrap() -> None:
        try:
            # any connected socket: the relay's to its target as well as a tunnel's accepted one
            await loop.connect_accepted_socket(lambda: bridge, sock)
        except OSError as exc:  # gone before it could be wrapped: a peer's failure too
            bridge.fail(exc)

    return await _bridged(stream, bridge, wrap(), result)


async def _bridged(
    stream: DirectStream, bridge: _Bridge, start: Awaitable[None], result: PumpResult
) -> PumpResult:
    """Run ``bridge`` once ``start`` has given it its connection, until both ends are done."""
    try:
        await start
        await bridge.finished
    finally:
        # at once, without waiting (the caller may be cancelled): neither outlives the pump;
        # a connection never made (a refused dial) leaves the stream to the caller
        bridge.close()
        if not bridge.clean and bridge.connected:
            stream.reset_now()
    with contextlib.suppress(TransportError):
        await stream.aclose()
    return result


class _Bridge(asyncio.Protocol):
    """The socket's protocol and the stream's sink: bytes cross in the loop's callbacks."""

    def __init__(
        self,
        stream: DirectStream,
        sock: socket.socket | None,
        result: PumpResult,
        finished: asyncio.Future[None],
        first: bytes = b"",
        connected: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        #: the socket the connection was made on, if made by the caller (else the loop's)
        self._sock = sock
        self._result = result
        self._first = first
        self._connected = connected
        self.finished = finished
        self.clean = False
        self._transport: asyncio.Transport | None = None
        #: read from the socket, not yet taken by the stream (its window was full)
        self._pending = b""
        self._socket_ended = False  # the socket's EOF, passed on once nothing is pending
        self._stream_ended = False  # the stream's EOF, passed on to the socket
        #: why the socket is not read: the stream's window, the session's pipe
        self._holds: set[str] = set()
        self._send_full = False  # the socket's send buffer is full: no credit for the peer
        self._owed = 0  # credit held back meanwhile

    # the socket's side (asyncio.Protocol)

    @property
    def connected(self) -> bool:
        """Whether there is a connection: the caller's socket, or one the loop has made."""
        return self._sock is not None or self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._first:
            self._transport.write(self._first)
            self._first = b""
        if self._connected is not None:
            try:
                self._connected()
            except TransportError as exc:  # the stream's session ended meanwhile
                self._fail(exc)
                return
        self._stream.attach(self)

    def data_received(self, data: bytes) -> None:
        if self.finished.done():
            return
        if self._pending:  # read while held (a transport may deliver one more)
            self._pending += data
            return
        self._send(data)

    def eof_received(self) -> bool:
        self._socket_ended = True
        if not self._pending:
            self._end_socket()
        return True  # half-closed: the stream's data may still come

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("the connection closed"))

    def pause_writing(self) -> None:
        self._send_full = True

    def resume_writing(self) -> None:
        self._send_full = False
        owed, self._owed = self._owed, 0
        if owed and not self.finished.done():
            self._stream.consume(owed)

    # the stream's side (StreamSink)

    def deliver(self, data: bytes) -> None:
        if self.finished.done() or self._transport is None:
            return
        self._transport.write(data)
        self._result.received += len(data)
        if self._send_full:
            self._owed += len(data)
        else:
            self._stream.consume(len(data))

    def end(self) -> None:
        self._stream_ended = True
        if self._transport is not None and not self.finished.done():
            with contextlib.suppress(OSError, RuntimeError):  # a socket already reset
                self._transport.write_eof()
        self._done_if_both()

    def fail(self, error: Exception) -> None:
        self._fail(error)

    def window_opened(self) -> None:
        if self._pending and not self.finished.done():
            data, self._pending = self._pending, b""
            self._send(data)

    # within

    def _send(self, data: bytes) -> None:
        try:
            sent = self._stream.send_now(data)
        except TransportError as exc:
            self._fail(exc)
            return
        self._result.sent += sent
        if sent < len(data):
            self._pending = data[sent:]
            self._hold("window")
            return
        self._release("window")
        if self._socket_ended:
            self._end_socket()
        elif self._stream.when_writable(self._writable):
            self._hold("pipe")

    def _writable(self) -> None:
        self._release("pipe")

    def _end_socket(self) -> None:
        try:
            self._stream.close_write_now()
        except TransportError as exc:
            self._fail(exc)
            return
        self._done_if_both()

    def _done_if_both(self) -> None:
        if self._socket_ended and self._stream_ended and not self._pending:
            self.clean = True
            _settle(self.finished)

    def _fail(self, error: BaseException) -> None:
        if self.finished.done():
            return
        if isinstance(error, OSError | TransportError):
            self._result.error = f"{type(error).__name__}: {error}"
        _settle(self.finished)

    def _hold(self, reason: str) -> None:
        if not self._holds and self._transport is not None:
            self._transport.pause_reading()
        self._holds.add(reason)

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        """Close the socket (gracefully after a clean end, else with an RST); the stream
        is the pump's to close."""
        _settle(self.finished)
        transport = self._transport
        if transport is None:
            if self._sock is not None:
                abort(self._sock)
        elif self.clean:
            transport.close()
        else:
            sock = self._sock if self._sock is not None else transport.get_extra_info("socket")
            if sock is not None:  # None: the loop has closed the connection already
                with contextlib.suppress(OSError):  # already reset by the peer
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
