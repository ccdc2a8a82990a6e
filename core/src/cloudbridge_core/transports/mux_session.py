"""asyncio sessions and streams on the sans-IO multiplexer, over any ordered byte pipe.

A transport only supplies a :class:`Pipe` (TLS over TCP here; a WebSocket elsewhere) and
gets a :class:`~cloudbridge_core.providers.Session` with flow-controlled streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, cast, runtime_checkable

from cloudbridge_core.errors import ProtocolViolation, StreamAborted, TransportClosed
from cloudbridge_core.protocol import mux
from cloudbridge_core.pump import StreamSink
from cloudbridge_core.transports.preauth import Admission


class Pipe(Protocol):
    """An ordered, reliable byte pipe; ``receive`` returns ``b""`` at its end.

    A pipe may also have a synchronous ``abort()`` that drops the connection without a
    closing handshake (a session whose pre-auth deadline passes uses it when present),
    and a synchronous ``authenticated()`` that lifts a pre-auth bound of its own.
    """

    async def receive(self) -> bytes: ...

    async def send(self, data: bytes | bytearray) -> None: ...

    async def aclose(self) -> None: ...


class PipeReceiver(Protocol):
    """What a :class:`DirectPipe` delivers to once attached."""

    def pipe_data(self, data: bytes) -> None: ...

    def pipe_ended(self, error: BaseException | None) -> None: ...

    def pipe_writable(self) -> None: ...


@runtime_checkable
class DirectPipe(Pipe, Protocol):
    """A pipe that delivers as bytes arrive, in the connection's callback, and writes at
    once (:class:`ProtocolPipe`; the WebSocket plugin's): its session runs without a
    reader task (see :class:`MuxSession`)."""

    @property
    def writing_paused(self) -> bool:
        """Whether the connection's send buffer is full (``pipe_writable``: no longer)."""

    def attach(self, receiver: PipeReceiver) -> None:
        """Deliver to ``receiver`` from now on, starting with what arrived before."""

    def write_now(self, data: bytes | bytearray) -> None:
        """Queue ``data`` at once; ``ConnectionError`` when the connection is gone."""

    def hold(self, reason: str) -> None:
        """Stop reading until every reason held is released."""

    def release(self, reason: str) -> None: ...


#: bytes read ahead of the session before the socket is paused; a stranger's connection
#: gets :data:`PREAUTH_HIGH_WATER` until it is authenticated (a security limit)
HIGH_WATER = 1024 * 1024
PREAUTH_HIGH_WATER = 64 * 1024
#: how long a closing connection may take to send what is queued before it is cut off
CLOSE_GRACE = 2.0


class ProtocolPipe(asyncio.Protocol):
    """A :class:`DirectPipe` that is itself the asyncio protocol of a TCP or TLS connection.

    Once attached (a :class:`MuxSession` attaches), what arrives goes to the receiver in
    ``data_received``. Until then, and for a user of :meth:`receive` alone, it is handed
    to :meth:`receive` as the loop delivered it (no stream reader copying it in and out
    again); past ``high_water`` bytes unread, the pipe stops reading the socket until
    :meth:`receive` catches up, so the peer's TCP window holds it back.
    """

    def __init__(self, high_water: int = HIGH_WATER) -> None:
        self._high_water = high_water
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._ended = False
        self._error: BaseException | None = None
        self._arrived: asyncio.Future[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._lost = asyncio.Event()
        self._receiver: PipeReceiver | None = None
        #: why reading is paused while a receiver is attached (empty: reading)
        self._holds: set[str] = set()
        self.transport: asyncio.Transport | None = None
        #: the peer's IP address (the relay limits request rates per address too)
        self.peer_address: str | None = None

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a TCP or TLS connection (uvloop's are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_address = str(peer[0]) if isinstance(peer, tuple) else None

    def data_received(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.pipe_data(data)
            return
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued > self._high_water and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._ended = True
        if self._receiver is not None:
            self._receiver.pipe_ended(None)
        self._wake_reader()
        return False  # close the transport: a pipe is not half-closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._error = exc
        self._lost.set()
        if self._receiver is not None:
            self._receiver.pipe_ended(exc)
        self._wake_reader()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._receiver is not None:
            self._receiver.pipe_writable()

    def _wake_reader(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    # the session's side

    def attach(self, receiver: PipeReceiver) -> None:
        """Deliver from now on to ``receiver`` as bytes arrive, in the loop's callback,
        instead of through :meth:`receive`: no task between the socket and the session.
        What arrived before is delivered at once."""
        self._receiver = receiver
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._queued = 0
            receiver.pipe_data(data)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._ended:
            receiver.pipe_ended(self._error)

    def hold(self, reason: str) -> None:
        """Stop reading the socket until :meth:`release` of every reason held."""
        if not self._holds and self.transport is not None:
            self.transport.pause_reading()
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def write_now(self, data: bytes | bytearray) -> None:
        """Queue ``data`` at once (the transport buffers it); the caller watches
        :attr:`writing_paused` for backpressure."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def receive(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise ConnectionResetError(str(self._error)) from self._error
            if self._ended:
                return b""
            self._arrived = asyncio.get_running_loop().create_future()
            try:
                await self._arrived
            finally:
                self._arrived = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._queued = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def send(self, data: bytes | bytearray) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)
        if self._writing_paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    async def aclose(self) -> None:
        """Close once what is queued is sent (TLS: with its close_notify), waiting for the
        connection to be gone; a peer that does not take it within :data:`CLOSE_GRACE`
        is cut off (an unread socket must not keep the close waiting)."""
        if self.transport is None:
            return
        self.transport.close()
        try:
            await asyncio.wait_for(self._lost.wait(), CLOSE_GRACE)
        except TimeoutError:
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def authenticated(self) -> None:
        """Lift the pre-auth bound on what is read ahead of the session."""
        self._high_water = max(self._high_water, HIGH_WATER)


class MuxStream:
    """One stream of a :class:`MuxSession`."""

    def __init__(self, session: MuxSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        #: received frames' payloads, handed out whole when they fit (no copy); a list,
        #: not a deque: it holds a few frames at most, and an idle stream's costs less
        self._buffer: list[bytes] = []
        #: bytes received and not yet read
        self.buffered = 0
        self._eof = False
        self._error: Exception | None = None
        # futures made only while a reader or writer waits: an idle stream holds none
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._window_opened = False
        self._closed = False
        self._sink: StreamSink | None = None

    @property
    def direct(self) -> bool:
        """Whether the stream can deliver to a sink and send at once (:meth:`attach`,
        :meth:`send_now`): its session parses frames as they arrive and writes at once."""
        return self._session.direct

    def attach(self, sink: StreamSink) -> None:
        """Deliver what the peer sends to ``sink`` from now on, starting with what is
        buffered; :meth:`read` is no longer used. Needs :attr:`direct`."""
        self._sink = sink
        if self._buffer:
            pieces, self._buffer = self._buffer, []
            self.buffered = 0
            for piece in pieces:
                sink.deliver(piece)
        if self._error is not None:
            sink.fail(self._error)
        elif self._eof:
            sink.end()

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Queue what the peer's window allows of ``data`` and write it at once; return
        how much (:meth:`StreamSink.window_opened` says when to send the rest)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TransportClosed(f"stream {self.stream_id} is closed for writing")
        sent = self._session.send(self.stream_id, data)
        self._session.flush_now()
        return sent

    def send_soon(self, data: bytes, within: float) -> None:
        """Queue ``data`` to go out with the session's next write, or alone ``within``
        seconds from now at the latest (:meth:`MuxSession.flush_soon`): a small message
        (a tunnel's accept) then shares a record with the bytes that follow it closely.
        ``data`` must fit the peer's window. Needs :attr:`direct`."""
        if self._session.send(self.stream_id, data) < len(data):
            raise TransportClosed(f"stream {self.stream_id} has no window for {len(data)} bytes")
        self._session.flush_soon(within)

    def consume(self, count: int) -> None:
        """A sink has taken ``count`` bytes: the peer may send that much more."""
        self._session.consumed(self.stream_id, count)
        self._session.flush_now()

    def when_writable(self, callback: Callable[[], None]) -> bool:
        """False when the session's pipe takes more now; else ``callback`` is called once
        it does (a sink's producer stops reading meanwhile)."""
        return self._session.when_writable(callback)

    def close_write_now(self) -> None:
        if not self._closed:
            self._closed = True
            self._session.end(self.stream_id)
            self._session.flush_now()

    def reset_now(self) -> None:
        """:meth:`reset`, written at once."""
        if self._error is not None:
            return
        self._session.reset(self.stream_id)
        self._closed = True
        self.fail(StreamAborted(f"stream {self.stream_id} was reset locally"))
        self._session.flush_now()

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer and not self._eof and self._error is None:
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._buffer:
            data = self._take(max_bytes)
            self.buffered -= len(data)
            self._session.consumed(self.stream_id, len(data))
            with contextlib.suppress(TransportClosed):  # the next read reports it
                await self._session.flush()
            return data
        if self._error is not None:
            raise self._error
        return b""

    def _take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from the front of the buffer."""
        first = self._buffer[0]
        if len(first) >= max_bytes:
            if len(first) == max_bytes:
                del self._buffer[0]
                return first
            self._buffer[0] = first[max_bytes:]
            return first[:max_bytes]
        count, size = 1, len(first)
        while count < len(self._buffer) and size + len(self._buffer[count]) <= max_bytes:
            size += len(self._buffer[count])
            count += 1
        pieces = self._buffer[:count]
        del self._buffer[:count]
        return first if count == 1 else b"".join(pieces)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise TransportClosed(f"stream {self.stream_id} is closed for writing")
            # noted before sending, not after: the window update may arrive while the flush
            # waits, and looking only then would miss it (the stream would wait for ever)
            self._window_opened = False
            sent = self._session.send(self.stream_id, view)
            view = view[sent:]
            await self._session.flush()
            if view and not self._window_opened and self._error is None:
                self._write_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._write_waiter
                finally:
                    self._write_waiter = None

    async def close_write(self) -> None:
        if not self._closed:
            self._closed = True
            self._session.end(self.stream_id)
            await self._session.flush()

    async def aclose(self) -> None:
        """Close gracefully (FIN) once the peer has finished sending, otherwise reset."""
        if self._error is not None:
            return
        if self._eof:
            with contextlib.suppress(TransportClosed):
                await self.close_write()
            return
        await self.reset()

    async def reset(self) -> None:
        if self._error is not None:
            return
        self._session.reset(self.stream_id)  # an RST frame unless both sides had finished
        self.fail(StreamAborted(f"stream {self.stream_id} was reset locally"))
        self._closed = True
        with contextlib.suppress(TransportClosed):  # a lost session has reset every stream
            await self._session.flush()

    # called by the session when the peer's frames arrive

    def feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.deliver(data)
            return
        self._buffer.append(data)
        self.buffered += len(data)
        _wake(self._read_waiter)

    def end_of_data(self) -> None:
        self._eof = True
        if self._sink is not None:
            self._sink.end()
        _wake(self._read_waiter)

    def fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
            if self._sink is not None:
                self._sink.fail(error)
        _wake(self._read_waiter)
        _wake(self._write_waiter)

    def window_opened(self) -> None:
        self._window_opened = True
        if self._sink is not None:
            self._sink.window_opened()
        _wake(self._write_waiter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class MuxSession:
    """A :class:`~cloudbridge_core.providers.Session` driving a :class:`MuxConnection`.

    A server session given an ``admission`` holds its peer to the pre-auth budget until
    :meth:`authenticated`: one stream with a small window, and the session closes when the
    admission's deadline passes first.

    Over a pipe that can deliver as bytes arrive and write at once (:class:`ProtocolPipe`),
    the session parses and dispatches frames in the connection's own callback, and its
    streams can hand data straight to a sink (:meth:`MuxStream.attach`): a byte crosses
    no task between the sockets. Over any other pipe, a reader task receives.
    """

    def __init__(
        self,
        pipe: Pipe,
        *,
        is_dialer: bool,
        limits: mux.MuxLimits | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._pipe = pipe
        self._connection = mux.MuxConnection(
            is_dialer, limits or mux.MuxLimits(), preauth=admission is not None
        )
        self._admission = admission
        self._closing: asyncio.Task[None] | None = None
        if admission is not None:
            admission.watch(self._expired)
        self._streams: dict[int, MuxStream] = {}
        self._incoming: deque[MuxStream] = deque()
        #: a future per caller waiting in accept_stream (rarely more than one)
        self._accepting: list[asyncio.Future[None]] = []
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._close_reason = "session closed"
        #: awaited by the reader with the number of PINGs a read carried, before it reads
        #: on: the relay slows (or ends) a peer flooding PINGs the session answers itself
        self.pace_pings: Callable[[int], Awaitable[None]] | None = None
        self._backlog_room = asyncio.Event()
        self._pacing: asyncio.Task[None] | None = None
        #: writes what is queued unless a write comes first (see :meth:`flush_soon`)
        self._deferred: asyncio.TimerHandle | None = None
        #: called once the pipe takes more (see :meth:`when_writable`)
        self._writable_callbacks: list[Callable[[], None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._direct: DirectPipe | None = pipe if isinstance(pipe, DirectPipe) else None
        if self._direct is not None:
            self._direct.attach(self)
        else:
            self._reader = asyncio.create_task(self._read_loop())

    @property
    def direct(self) -> bool:
        """Whether frames are handled as they arrive and written at once (see the class)."""
        return self._direct is not None

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def peer_address(self) -> str | None:
        """The peer's IP address, when the pipe knows it."""
        address = getattr(self._pipe, "peer_address", None)
        return address if isinstance(address, str) else None

    async def open_stream(self) -> MuxStream:
        self._raise_if_closed()
        stream_id = self._connection.open_stream()
        stream = self._streams[stream_id] = MuxStream(self, stream_id)
        if self._direct is not None:
            # written after this turn of the loop: a first write made meanwhile (a tunnel's
            # open) carries the stream's opening with it, in one record and one send
            asyncio.get_running_loop().call_soon(self.flush_now)
        else:
            await self.flush()
        return stream

    async def accept_stream(self) -> MuxStream:
        while not self._incoming:
            self._raise_if_closed()
            # woken directly: one future shared behind asyncio.shield cost a callback and a
            # turn of the loop more per stream (the relay accepts one per tunnel)
            waiter = asyncio.get_running_loop().create_future()
            self._accepting.append(waiter)
            try:
                await waiter
            finally:
                self._accepting.remove(waiter)
        stream = self._incoming.popleft()
        self._backlog_room.set()
        if self._direct is not None and len(self._incoming) < self._connection.limits.max_streams:
            self._direct.release("backlog")
        return stream

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def authenticated(self) -> None:
        """The relay authenticated the peer: lift the pre-auth budget. Idempotent."""
        self._connection.authenticated()
        # a pipe with its own pre-auth bound (a WebSocket's message size) lifts it too
        lift: Callable[[], object] | None = getattr(self._pipe, "authenticated", None)
        if lift is not None and self._admission is not None:
            lift()
        self._end_preauth()

    def _end_preauth(self) -> None:
        if self._admission is not None:
            self._admission.release()
            self._admission = None

    def _expired(self) -> None:
        self._admission = None  # counted and released by the admission itself
        self._shut("no authentication within the pre-auth deadline")
        self._drop()

    def _drop(self) -> None:
        """End an unauthenticated peer's connection at once: a graceful close would wait
        for a peer that may stall or no longer be read (a stranger gets no say)."""
        abort: Callable[[], object] | None = getattr(self._pipe, "abort", None)
        if abort is not None:
            abort()
        else:
            self._closing = asyncio.get_running_loop().create_task(self._pipe.aclose())

    def abort(self, reason: str) -> None:
        """End the session at once, without a closing handshake: for a peer the relay gives
        up on (a flooder), which may not be reading and gets no say in how long it takes."""
        self._shut(reason)
        self._drop()

    async def aclose(self) -> None:
        if not self._closed.is_set():
            self._connection.close()
            with contextlib.suppress(OSError, ConnectionError, TransportClosed):
                await self.flush()
            self._shut("session closed locally")
        await self._pipe.aclose()
        for task in (self._reader, self._pacing):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # used by the streams

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        self._raise_if_closed()
        return self._connection.send_data(stream_id, data)

    def end(self, stream_id: int) -> None:
        self._connection.end_stream(stream_id)
        self._forget_if_done(stream_id)

    def reset(self, stream_id: int) -> None:
        self._connection.reset_stream(stream_id)
        self._streams.pop(stream_id, None)

    def consumed(self, stream_id: int, count: int) -> None:
        self._connection.stream_consumed(stream_id, count)

    async def flush(self) -> None:
        if not self._connection.has_data_to_send:  # most reads owe the peer nothing
            return
        async with self._send_lock:
            data = self._connection.data_to_send()
            self._cancel_deferred()
            if data:
                try:
                    await self._pipe.send(data)
                except (OSError, ConnectionError) as exc:
                    self._shut(f"connection lost: {exc}")
                    raise TransportClosed(self._close_reason) from exc

    def flush_now(self) -> None:
        """Write what is queued at once (a direct session's pipe buffers it); a lost
        connection shuts the session."""
        if self._direct is None or not self._connection.has_data_to_send:
            return
        self._cancel_deferred()
        try:
            self._direct.write_now(self._connection.data_to_send())
        except (OSError, ConnectionError) as exc:
            self._shut(f"connection lost: {exc}")

    def flush_soon(self, within: float) -> None:
        """Write what is queued with the next write, or ``within`` seconds from now if
        none comes first (a direct session): one record instead of two when more follows
        soon, and no wake-up when it does."""
        if self._deferred is None:
            self._deferred = asyncio.get_running_loop().call_later(within, self._flush_deferred)

    def _flush_deferred(self) -> None:
        self._deferred = None
        self.flush_now()

    def _cancel_deferred(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    def when_writable(self, callback: Callable[[], None]) -> bool:
        """False when the pipe takes more now; else ``callback`` runs once it does."""
        if self._direct is None or not self._direct.writing_paused or self.is_closed:
            return False
        self._writable_callbacks.append(callback)
        return True

    # a direct session's pipe calls these (PipeReceiver)

    def pipe_data(self, data: bytes) -> None:
        assert self._direct is not None  # only a direct session's pipe delivers
        if self._closed.is_set():
            return
        try:
            events = self._connection.receive_data(data)
        except ProtocolViolation as exc:
            stranger = self._admission is not None
            self._shut(str(exc))
            if stranger:  # no GO_AWAY, no closing handshake: see _drop
                self._drop()
            else:
                self.flush_now()
            return
        pings = 0
        for event in events:
            pings += isinstance(event, mux.PingReceived)
            self._dispatch(event)
        wrote = self._connection.has_data_to_send
        self.flush_now()
        if wrote and self._direct.writing_paused:  # what the peer makes us send waits for it
            self._direct.hold("writing")
        if pings and self.pace_pings is not None and not self._closed.is_set():
            self._direct.hold("pings")
            paced = self._pace(self.pace_pings, pings, self._direct)
            self._pacing = asyncio.get_running_loop().create_task(paced)
        if len(self._incoming) >= self._connection.limits.max_streams:
            self._direct.hold("backlog")  # see _wait_for_backlog_room

    @staticmethod
    async def _pace(pace: Callable[[int], Awaitable[None]], pings: int, pipe: DirectPipe) -> None:
        await pace(pings)
        pipe.release("pings")

    def pipe_ended(self, error: BaseException | None) -> None:
        if error is None:
            self._shut("the peer closed the connection")
        else:
            self._shut(f"connection lost: {error}")

    def pipe_writable(self) -> None:
        assert self._direct is not None
        self._direct.release("writing")
        callbacks, self._writable_callbacks = self._writable_callbacks, []
        for callback in callbacks:
            callback()

    # the reader (a pipe that only receives)

    async def _read_loop(self) -> None:
        try:
            while not self._closed.is_set():
                data = await self._pipe.receive()
                if not data:
                    self._shut("the peer closed the connection")
                    break
                pings = 0
                for event in self._connection.receive_data(data):
                    pings += isinstance(event, mux.PingReceived)
                    self._dispatch(event)
                await self.flush()
                if pings and self.pace_pings is not None:
                    await self.pace_pings(pings)
                await self._wait_for_backlog_room()
        except ProtocolViolation as exc:
            stranger = self._admission is not None
            self._shut(str(exc))
            if stranger:  # no GO_AWAY, no closing handshake: see _drop
                self._drop()
                return
            with contextlib.suppress(OSError, ConnectionError, TransportClosed):
                await self.flush()
        except (OSError, ConnectionError, TransportClosed) as exc:
            self._shut(f"connection lost: {exc}")

    def _dispatch(self, event: mux.Event) -> None:
        if isinstance(event, mux.ConnectionClosed):
            self._shut(f"the peer closed the session (code {event.code})")
            return
        if isinstance(event, mux.PongReceived | mux.PingReceived):
            return
        if isinstance(event, mux.StreamOpened):
            opened = self._streams[event.stream_id] = MuxStream(self, event.stream_id)
            self._incoming.append(opened)
            self._wake_acceptors()
            return
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if isinstance(event, mux.DataReceived):
            stream.feed(event.data)
        elif isinstance(event, mux.StreamEnded):
            stream.end_of_data()
            self._forget_if_done(event.stream_id)
        elif isinstance(event, mux.StreamReset):
            stream.fail(StreamAborted(f"stream {event.stream_id} was reset by the peer"))
            self._streams.pop(event.stream_id, None)
        elif isinstance(event, mux.WindowUpdated):
            stream.window_opened()

    async def _wait_for_backlog_room(self) -> None:
        """Streams the peer opened wait to be accepted in a backlog of ``max_streams`` at
        most (reset ones too, which the connection no longer counts); past it the reader
        stops and flow control holds the peer back, so opening and resetting streams
        faster than they are accepted queues nothing without bound."""
        while len(self._incoming) >= self._connection.limits.max_streams:
            self._backlog_room.clear()
            await self._backlog_room.wait()

    def _forget_if_done(self, stream_id: int) -> None:
        if not self._connection.has_stream(stream_id):
            self._streams.pop(stream_id, None)

    def _wake_acceptors(self) -> None:
        for waiter in self._accepting:
            _wake(waiter)

    def _shut(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self._closed.set()
        self._cancel_deferred()
        self._end_preauth()
        self._connection.abandon()
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.fail(TransportClosed(reason))
        self._wake_acceptors()
        if self._pacing is not None:
            self._pacing.cancel()
        callbacks, self._writable_callbacks = self._writable_callbacks, []
        for callback in callbacks:  # they find the session closed
            callback()

    def _raise_if_closed(self) -> None:
        if self._closed.is_set():
            raise TransportClosed(self._close_reason)
