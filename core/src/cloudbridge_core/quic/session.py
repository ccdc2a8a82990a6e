"""A QUIC connection as a CloudBridge session: native QUIC streams, bounded buffers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from cloudbridge_core.errors import StreamAborted, TransportClosed, TransportError
from cloudbridge_core.quic.buffers import widen_buffers
from cloudbridge_core.quic.flow import BoundedQuicConnection
from cloudbridge_core.quic.gso import DatagramSender
from cloudbridge_core.quic.pacing import batch_pacing
from cloudbridge_core.quic.pmtu import (
    apply_datagram_size,
    forbid_fragmentation,
    is_too_big,
    path_payload_size,
)
from cloudbridge_core.quic.reset import SMALLEST_RESET, TOKEN_SIZE

if TYPE_CHECKING:
    from cloudbridge_core.transports.preauth import Admission, PreauthGate

#: application error code of a stream closed before both sides finished
STREAM_CANCELLED = 0x10C
#: the largest piece handed to aioquic at once, so one writer cannot hog the loop
_WRITE_PIECE = 64 * 1024
#: stream bytes a peer not yet authenticated may send: its hello (16 KiB) and more
#: than enough room around it. A security limit, as the core multiplexer's preauth_window.
PREAUTH_BYTES = 32 * 1024
#: QUIC transport error codes (RFC 9000, 20.1)
_CONNECTION_REFUSED = 0x2
_PROTOCOL_VIOLATION = 0xA
#: seconds the relay must have been silent before an ICMP port unreachable counts. A
#: security limit (with the probe that follows, see ``QuicSession._refused``): anyone on the
#: path can forge one, and a forgery must not end a session whose relay still talks
REFUSAL_SILENCE = 1.0


class QuicStream:
    """Implements :class:`~cloudbridge_core.providers.Stream` on one bidirectional QUIC stream.

    The session feeds it until both directions have ended or it failed, so a STOP_SENDING
    arriving after this side read the peer's EOF still fails the writes that follow. A
    failed stream drops what it holds unread: its reads raise at once.
    """

    def __init__(self, session: QuicSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._received: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._eof = False  # all the peer's data and its FIN have arrived
        self._eof_read = False
        self._error: TransportError | None = None
        self._write_closed = False

    @property
    def error(self) -> TransportError | None:
        """Why the stream failed: reset by either side, or the session ended."""
        return self._error

    @property
    def peer_finished(self) -> bool:
        """Whether all the peer's data and its FIN have arrived."""
        return self._eof

    # ---- fed by the session ----------------------------------------------------------------

    def data_received(self, data: bytes, end: bool) -> None:
        if data:
            self._received.append(data)
        self._eof = self._eof or end
        self._readable.set()

    def failed(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
            self._received.clear()
        self._readable.set()

    # ---- Stream ----------------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._received:
            if self._error is not None:
                raise self._error
            if self._eof:
                self._eof_read = True
                if self._write_closed:
                    self._session.abandon(self, reset=False)
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._received.popleft()
        if len(chunk) > max_bytes:
            self._received.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._session.consumed(self.stream_id, len(chunk))
        return chunk

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            self._check_writable()
            await self._session.send_space(self)
            self._check_writable()
            piece = bytes(view[:_WRITE_PIECE])
            self._send(piece, end=False)
            view = view[len(piece) :]

    async def close_write(self) -> None:
        if self._write_closed or self._error is not None:
            return
        self._write_closed = True
        self._send(b"", end=True)
        if self._eof_read:
            self._session.abandon(self, reset=False)

    async def aclose(self) -> None:
        """Close gracefully (FIN) once the peer's EOF has arrived, otherwise reset."""
        if self._error is None and self._eof:
            await self.close_write()
            self.failed(StreamAborted("the stream was closed"))
            self._session.abandon(self, reset=False)
            return
        await self.reset()

    async def reset(self) -> None:
        """RESET_STREAM for what this side has not finished sending (even after its FIN,
        until all of it is acknowledged), STOP_SENDING for what the peer has not: the
        peer's writes fail, and so do its reads unless all this side sent has arrived."""
        if self._error is not None:
            return
        finished = self._write_closed and self._eof
        self._write_closed = True
        self.failed(StreamAborted("the stream was reset locally"))
        self._session.abandon(self, reset=not finished)

    def _send(self, data: bytes, *, end: bool) -> None:
        try:
            self._session.send(self.stream_id, data, end=end)
        except StreamAborted as error:  # aioquic ended its side first: the stream is over
            self.failed(error)
            self._session.abandon(self, reset=True)
            raise

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._write_closed:
            raise TransportError("write after close_write")


class QuicSession(QuicConnectionProtocol):
    """Implements :class:`~cloudbridge_core.providers.Session` on an aioquic connection."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        datagram_ceiling: int,
        keepalive: float | None = None,
        on_ready: Callable[[QuicSession], None] | None = None,
        preauth: PreauthGate | None = None,
    ) -> None:
        super().__init__(quic, stream_handler)
        #: a server session waits for its first datagram (and address) to be admitted
        self._gate = preauth
        self._admission: Admission | None = None
        self._preauth_bytes = 0
        assert isinstance(quic, BoundedQuicConnection)
        self._bounded = quic
        batch_pacing(quic)
        self._sender: DatagramSender | None = None
        self._datagram_ceiling = datagram_ceiling
        self._on_ready = on_ready
        self._keepalive_interval = keepalive
        self._keepalive: asyncio.Task[None] | None = None
        self._streams: dict[int, QuicStream] = {}
        #: streams the application left while the peer may still send on them: what
        #: arrives for them is dropped, never taken for a new stream
        self._abandoned: set[int] = set()
        self._incoming: asyncio.Queue[QuicStream | None] = asyncio.Queue()
        self._progress: asyncio.Future[None] | None = None
        self._error: TransportError | None = None
        #: when the last datagram arrived (loop time); None: none yet
        self._heard: float | None = None
        #: when a refusal made this side PING the relay to see whether it still answers
        self._probed: float | None = None
        #: the peer's port is closed: the client's socket heard an ICMP port unreachable
        self.refused = False
        self.handshake: events.HandshakeCompleted | None = None

    # ---- Session ---------------------------------------------------------------------------

    async def open_stream(self) -> QuicStream:
        if self._error is not None:
            raise self._error
        stream_id = self._quic.get_next_available_stream_id()
        self._quic._get_or_create_stream_for_send(stream_id)  # reserves the id
        stream = self._streams[stream_id] = QuicStream(self, stream_id)
        return stream

    async def accept_stream(self) -> QuicStream:
        stream = await self._incoming.get() if self._error is None else None
        if stream is None:
            self._incoming.put_nowait(None)  # every later caller learns it too
            raise self._error or TransportClosed("the QUIC connection is closed")
        return stream

    async def wait_connected(self) -> None:
        """Until the handshake has completed, however early: aioquic's own wait misses a
        handshake that completed before it was called (its event resolves only a waiter
        that exists), which a connect on a fast path can race; raises ``ConnectionError``
        if the connection ended without one."""
        if self.handshake is None and self._error is None:
            await super().wait_connected()
        if self.handshake is None:
            raise ConnectionError("the QUIC connection ended before its handshake completed")

    def authenticated(self) -> None:
        """The relay authenticated the peer: lift the pre-auth budget. Idempotent."""
        self._gate = None
        self._end_preauth()

    def _end_preauth(self) -> None:
        if self._admission is not None:
            self._admission.release()
            self._admission = None

    def _expired(self) -> None:
        self._admission = None  # counted and released by the admission itself
        self._refuse(_CONNECTION_REFUSED, "no authentication within the pre-auth deadline")

    def _refuse(self, error_code: int, reason: str) -> None:
        """Close a stranger's connection now, before it can cost more."""
        self._gate = None
        self.close_now(reason, error_code)

    def close_now(self, reason: str, error_code: int = 0) -> None:
        """Send the CONNECTION_CLOSE and end the session at once, not after its closing
        period (:meth:`aclose`): for a stranger, and for every session of a relay that
        stops, whose loop took seconds to see 1,000 closing periods out while its clients
        waited for it to come back."""
        if self._error is not None:
            return
        self._quic.close(error_code=error_code, reason_phrase=reason)
        self.transmit()
        self._terminate(TransportClosed(reason))

    async def aclose(self) -> None:
        try:
            if self._error is None:
                self.close(error_code=0, reason_phrase="session closed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wait_closed(), 1.0)
                self._terminate(TransportClosed("the session was closed"))
        finally:
            if self._quic.configuration.is_client and self._transport is not None:
                self._transport.close()  # the client's own socket (a server's is shared)

    @property
    def peer_address(self) -> str | None:
        """The peer's IP address on the connection's current path (the relay limits
        request rates per address too)."""
        paths = self._quic._network_paths
        return str(paths[0].addr[0]) if paths else None

    @property
    def datagram_size(self) -> int:
        """The size of the datagrams sent now (from the path MTU)."""
        return self._quic._max_datagram_size

    async def rebind(self) -> None:
        """Continue from a new local port, as after a NAT rebinding or a network change."""
        if self._transport is None:
            return
        old = self._transport
        family = old.get_extra_info("socket").family
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # noqa: S104 - any local address
            sock.connect(old.get_extra_info("peername"))  # to hear ICMP, as the first socket
            forbid_fragmentation(sock)
            await self._loop.create_datagram_endpoint(lambda: self, sock=sock)  # sets _transport
        except BaseException:
            sock.close()
            raise
        old.close()
        self._quic.send_ping(0)
        self.transmit()

    # ---- used by streams ------------------------------------------------------------------

    def send(self, stream_id: int, data: bytes, *, end: bool) -> None:
        """Queue ``data`` on the stream; raises :class:`StreamAborted` where aioquic
        refuses (its side was reset or finished): never aioquic's own exceptions."""
        try:
            self._quic.send_stream_data(stream_id, data, end)
        except (RuntimeError, ValueError) as error:
            raise StreamAborted(f"the QUIC stream cannot send: {error}") from error
        self._transmit_soon()

    async def send_space(self, stream: QuicStream) -> None:
        """Wait until the stream's unacknowledged bytes are under one window, or it failed."""
        while True:
            if self._error is not None:
                raise self._error
            quic_stream = self._quic._streams.get(stream.stream_id)
            if (
                stream.error is not None
                or quic_stream is None
                or len(quic_stream.sender._buffer) < self._bounded.stream_window
            ):
                return
            if self._progress is None:
                self._progress = self._loop.create_future()
            await self._progress

    def consumed(self, stream_id: int, count: int) -> None:
        if self._bounded.credit(stream_id, count):
            self._transmit_soon()

    def abandon(self, stream: QuicStream, *, reset: bool) -> None:
        """Stop feeding ``stream`` (once); with ``reset``, RESET_STREAM (a no-op once all
        of it is acknowledged) and, while the peer may still send, STOP_SENDING."""
        if self._streams.get(stream.stream_id) is not stream:
            return
        del self._streams[stream.stream_id]
        self._bounded.forget(stream.stream_id)
        if reset:
            with contextlib.suppress(ValueError, AssertionError):  # the stream already ended
                self._quic.reset_stream(stream.stream_id, STREAM_CANCELLED)
                if not stream.peer_finished:
                    self._quic.stop_stream(stream.stream_id, STREAM_CANCELLED)
            self._transmit_soon()
        self._settle(stream.stream_id)
        self._wake_writers()

    # ---- aioquic callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a peer session's virtual transport has none
            widen_buffers(sock)
        # uvloop's UDP transport is not an asyncio.DatagramTransport subclass, but one
        self._sender = DatagramSender(
            cast("asyncio.DatagramTransport", transport), self.error_received
        )

    def transmit(self) -> None:
        """aioquic's transmit, with the datagrams sent together (:class:`DatagramSender`);
        nothing once the socket is closed (the client's own, closed by ``aclose``, or a
        server's shared one, closed by its listener): asyncio would log each send to it
        (``socket.send() raised exception.``) and its timer would keep firing."""
        self._transmit_task = None
        assert self._sender is not None  # connection_made came first
        if self._transport is None or self._transport.is_closing():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = None
            return
        self._sender.send(self._quic.datagrams_to_send(now=self._loop.time()))
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def connection_lost(self, exc: Exception | None) -> None:
        # a transport replaced by ``rebind`` reports its end too: only the current one counts
        if self._transport is not None and self._transport.is_closing():
            waiter = self._connected_waiter  # cleared by the ConnectionTerminated that follows
            self._lost(TransportClosed("the session's socket was closed"))
            if waiter is not None and waiter.done() and not waiter.cancelled():
                waiter.exception()  # a connect that closed the socket has stopped waiting

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # aioquic transmits after every datagram; transmitting once per batch of datagrams
        # read together (uvloop reads up to 32 per wakeup) acknowledges them in one packet
        datagram = cast("bytes", data)  # a datagram transport's
        if self._is_stateless_reset(datagram):
            self._lost(TransportClosed("the relay restarted (QUIC stateless reset)"))
            return
        self._heard = self._loop.time()
        if self._gate is not None and self._admission is None:
            self._admission = self._gate.admit(str(addr[0]))
            if self._admission is None:  # over a cap (counted by the gate)
                self._refuse(_CONNECTION_REFUSED, "too many unauthenticated connections")
                return
            self._admission.watch(self._expired)
        self._quic.receive_datagram(datagram, addr, now=self._heard)
        self._process_events()
        self._transmit_soon()
        self._wake_writers()

    def error_received(self, exc: Exception) -> None:
        if is_too_big(exc):  # the path MTU dropped: ask the kernel again
            self.fit_datagrams()
        elif isinstance(exc, ConnectionRefusedError) and self._error is None:
            # only a client's socket hears this: it is connected to the relay's address
            self._refused()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if self._gate is not None:  # before authentication: one stream, one hello
                self._preauth_bytes += len(event.data)
                if self._preauth_bytes > PREAUTH_BYTES or (stream is None and self._streams):
                    self._refuse(_PROTOCOL_VIOLATION, "more than a hello before authentication")
                    return
            if event.stream_id in self._abandoned:  # still arriving after a reset
                self._settle(event.stream_id)
                return
            if stream is None:
                stream = self._streams[event.stream_id] = QuicStream(self, event.stream_id)
                self._incoming.put_nowait(stream)
            stream.data_received(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            self._fail_stream(event.stream_id, "the peer reset the stream")
        elif isinstance(event, events.StopSendingReceived):
            self._fail_stream(event.stream_id, "the peer stopped reading the stream")
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake = event
            self.fit_datagrams()
            if self._keepalive_interval:
                self._keepalive = self._loop.create_task(self._keep_alive(self._keepalive_interval))
            if self._on_ready is not None:
                self._on_ready(self)
        elif isinstance(event, events.ConnectionTerminated):
            reason = event.reason_phrase or f"error {event.error_code:#x}"
            self._terminate(TransportClosed(f"the QUIC connection ended: {reason}"))

    # ---- internals -------------------------------------------------------------------------

    def fit_datagrams(self) -> None:
        """Size the datagrams sent from now on for the current path (:meth:`path_datagram_size`)."""
        size = self.path_datagram_size()
        if size is not None:
            apply_datagram_size(self._quic, size)

    def path_datagram_size(self) -> int | None:
        """The datagram size the current path carries: from the kernel's path MTU."""
        path = self._quic._network_paths[0] if self._quic._network_paths else None
        return None if path is None else path_payload_size(path.addr, self._datagram_ceiling)

    async def _keep_alive(self, interval: float) -> None:
        """PINGs keep NAT bindings open and find a dead path before the idle timeout."""
        with contextlib.suppress(ConnectionError):
            while self._error is None:
                await asyncio.sleep(interval)
                self._quic.send_ping(0)
                self.transmit()

    def _fail_stream(self, stream_id: int, why: str) -> None:
        """The peer reset its side or stopped reading ours: the stream is over both ways."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.failed(StreamAborted(why))
            self.abandon(stream, reset=True)
        elif stream_id in self._abandoned:
            self._settle(stream_id)

    def _settle(self, stream_id: int) -> None:
        """Remember an abandoned stream until the peer can send nothing more on it."""
        receiver = self._quic._streams.get(stream_id)
        if receiver is None or receiver.receiver.is_finished:
            self._abandoned.discard(stream_id)
        else:
            self._abandoned.add(stream_id)

    def _refused(self) -> None:
        """An ICMP port unreachable: the relay's port is closed, or someone forged one.
        During the handshake it ends the session at once. After it, only once the relay
        has been silent for :data:`REFUSAL_SILENCE` and has left a PING, sent at the
        first such refusal, unanswered for QUIC's probe timeout: a relay that still
        answers keeps its session, however many refusals are forged."""
        now = self._loop.time()
        if self._heard is not None:
            if now - self._heard < REFUSAL_SILENCE:
                return
            if self._probed is None or self._probed < self._heard:
                self._probed = now
                self._quic.send_ping(0)
                self._transmit_soon()
                return
            if now - self._probed < self._quic._loss.get_probe_timeout():
                return
        self.refused = True
        self._lost(TransportClosed("the relay's port is closed (ICMP port unreachable)"))

    def _is_stateless_reset(self, data: bytes) -> bool:
        """Whether ``data`` ends in the reset token of the connection ID this side sends
        to (RFC 9000 10.3.1: never those of unused or retired IDs). Only short-header
        datagrams that can be resets are compared, once each, so this costs nearly
        nothing per datagram; only the relay's tokens can be recomputed after a restart
        (:mod:`cloudbridge_core.quic.reset`), so only the relay sends resets that match."""
        token = self._quic._peer_cid.stateless_reset_token
        return (
            len(data) >= SMALLEST_RESET
            and not data[0] & 0x80
            and bool(token)
            and hmac.compare_digest(data[-TOKEN_SIZE:], token)
        )

    def _lost(self, error: TransportClosed) -> None:
        """The relay is gone: end the session and its connection now, sending nothing
        more (to a closed port, or to a relay that has said it knows nothing of it)."""
        if self._error is not None:
            return
        self._terminate(error)
        quic = self._quic
        if quic._close_event is None:
            quic._close_event = events.ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase=error.message
            )
        quic._close_end()  # also fails a connect waiting for its handshake
        self._process_events()
        self.transmit()  # sends nothing, and stops the timer

    def _terminate(self, error: TransportError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._end_preauth()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for stream in self._streams.values():
            stream.failed(error)
        self._streams.clear()
        self._incoming.put_nowait(None)
        self._wake_writers()

    def _wake_writers(self) -> None:
        if self._progress is not None:
            if not self._progress.done():
                self._progress.set_result(None)
            self._progress = None
