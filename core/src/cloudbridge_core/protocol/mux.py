"""The stream multiplexer, sans-IO: many reliable, ordered streams over one byte pipe.

Bytes in (:meth:`MuxConnection.receive_data`), events out; bytes to send are collected
with :meth:`MuxConnection.data_to_send`. No sockets, no clocks, no asyncio: the core's
TLS transport, the WebSocket plugin and third-party transports drive it over whatever
ordered pipe they have.

Frame format (network byte order, in the spirit of yamux)::

    +--------+--------+-----------------+-----------------+----------------
    | type 8 | flags 8| stream id 32    | length 32       | payload (DATA)
    +--------+--------+-----------------+-----------------+----------------

    type   DATA (0): payload is ``length`` bytes of stream data
           WINDOW_UPDATE (1): ``length`` is the number of bytes the sender may now send
           PING (2): ``length`` is an opaque value echoed back with ACK
           GO_AWAY (3): stream 0; ``length`` is a close code; the connection ends
    flags  SYN (1) opens a stream, FIN (2) half-closes it, RST (4) resets it, ACK (8)
           answers a PING

Streams opened by the dialing side have odd ids, by the accepting side even ids. Each
stream has a receive window (flow control): a peer that sends beyond it, or frames larger
than the limit, breaks the protocol and the connection is closed.

A server connection made with ``preauth=True`` holds a stranger to the pre-auth budget
until :meth:`MuxConnection.authenticated`: the peer may open one stream (for its hello),
with a receive window of ``preauth_window`` instead of ``initial_window``; a second stream
or more data breaks the protocol. The wire format does not change: the peer assumes the
full window, and the window the server grants it afterwards is the full window too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from cloudbridge_core.errors import ProtocolViolation

HEADER = struct.Struct("!BBII")


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(IntFlag):
    NONE = 0
    SYN = 1
    FIN = 2
    RST = 4
    ACK = 8


# the same values as plain ints, for parsing: making an enum member of every frame's type
# and flags, and combining flags, took longer than the rest of a small frame's handling
_DATA, _WINDOW_UPDATE, _PING, _GO_AWAY = (int(kind) for kind in FrameType)
_SYN, _FIN, _RST, _ACK = int(Flag.SYN), int(Flag.FIN), int(Flag.RST), int(Flag.ACK)


class CloseCode(IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    GOING_AWAY = 2


@dataclass(frozen=True)
class MuxLimits:
    """Named bounds; each protects the receiver's memory (these are security limits)."""

    max_frame_size: int = 64 * 1024
    initial_window: int = 256 * 1024
    max_streams: int = 1024
    #: what a peer not yet authenticated may make the receiver buffer: its one stream's
    #: window, room for the largest hello (16 KiB) and its length prefix. A security limit.
    preauth_window: int = 32 * 1024


# ---- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpened:
    stream_id: int


@dataclass(frozen=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the stream: no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    stream_id: int


@dataclass(frozen=True)
class WindowUpdated:
    """The peer's window for this stream grew: pending data may be sent."""

    stream_id: int


@dataclass(frozen=True)
class PongReceived:
    opaque: int


@dataclass(frozen=True)
class PingReceived:
    """The peer sent a PING; it is already answered (the event lets a caller rate it)."""

    opaque: int


@dataclass(frozen=True)
class ConnectionClosed:
    code: int


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PongReceived
    | PingReceived
    | ConnectionClosed
)


@dataclass
class _Stream:
    send_window: int
    receive_window: int
    consumed: int = 0
    local_closed: bool = False
    remote_closed: bool = False


@dataclass
class MuxConnection:
    """One side of a multiplexed connection."""

    is_dialer: bool
    limits: MuxLimits = field(default_factory=MuxLimits)
    preauth: bool = False

    def __post_init__(self) -> None:
        self._peer_opened = 0
        self._preauth_window = min(self.limits.preauth_window, self.limits.initial_window)
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if self.is_dialer else 2
        self._inbound = bytearray()
        self._outbound = bytearray()
        self.closed = False

    # ---- sending ------------------------------------------------------------------------

    def open_stream(self) -> int:
        """Open a stream and announce it to the peer; return its id."""
        self._check_open()
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = self._new_stream()
        self._frame(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id, 0)
        return stream_id

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the peer's window allows; return how much."""
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise ProtocolViolation(f"stream {stream_id} is not open for sending")
        allowed = min(len(data), stream.send_window)
        for start in range(0, allowed, self.limits.max_frame_size):
            chunk = data[start : min(start + self.limits.max_frame_size, allowed)]
            self._frame(FrameType.DATA, Flag.NONE, stream_id, len(chunk), chunk)
        stream.send_window -= allowed
        return allowed

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def end_stream(self, stream_id: int) -> None:
        """Half-close: the peer will read EOF after the data already sent."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self.closed:
            return
        stream.local_closed = True
        self._frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0)
        self._forget_if_done(stream_id)

    def reset_stream(self, stream_id: int) -> None:
        """Abort both directions of a stream."""
        if self._streams.pop(stream_id, None) is not None and not self.closed:
            self._frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0)

    def stream_consumed(self, stream_id: int, count: int) -> None:
        """The application read ``count`` bytes: let the peer send that much more."""
        stream = self._streams.get(stream_id)
        if stream is None or self.closed:
            return
        stream.consumed += count
        # update in batches, not per read, to keep the control traffic small
        if stream.consumed >= self.limits.initial_window // 2 and not stream.remote_closed:
            stream.receive_window += stream.consumed
            self._frame(FrameType.WINDOW_UPDATE, Flag.NONE, stream_id, stream.consumed)
            stream.consumed = 0

    def ping(self, opaque: int) -> None:
        self._check_open()
        self._frame(FrameType.PING, Flag.SYN, 0, opaque)

    def close(self, code: int = CloseCode.NORMAL) -> None:
        if not self.closed:
            self._frame(FrameType.GO_AWAY, Flag.NONE, 0, code)
            self.closed = True
            self._streams.clear()

    def abandon(self) -> None:
        """The pipe is gone: forget every stream without telling the peer."""
        self.closed = True
        self._streams.clear()

    def authenticated(self) -> None:
        """Lift the pre-auth budget: every stream gets the full window, the peer may open
        up to ``max_streams``. The peer already assumes the full window: nothing is sent."""
        if not self.preauth:
            return
        self.preauth = False
        for stream in self._streams.values():
            stream.receive_window += self.limits.initial_window - self._preauth_window

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outbound)

    def data_to_send(self) -> bytearray:
        """What is queued for the peer; the caller owns the returned buffer."""
        data, self._outbound = self._outbound, bytearray()
        return data

    # ---- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return what happened.

        Raises :class:`ProtocolViolation` when the peer breaks the protocol; a GO_AWAY
        with ``PROTOCOL_ERROR`` is then queued and the connection is closed.
        """
        if self.closed:
            return []
        # frames are parsed in place at an offset; only an incomplete last frame is kept
        # for the next call (cutting each frame off the front would move the rest each time)
        if self._inbound:
            self._inbound += data
            buffer: bytes | bytearray = self._inbound
        else:
            buffer = data
        view = memoryview(buffer)
        offset, end = 0, len(buffer)
        events: list[Event] = []
        try:
            while end - offset >= HEADER.size:
                kind, flags, stream_id, length = HEADER.unpack_from(buffer, offset)
                payload_size = length if kind == _DATA else 0
                # before authentication a frame larger than the whole budget is refused at
                # its header, before its payload is buffered
                limit = self._preauth_window if self.preauth else self.limits.max_frame_size
                if payload_size > limit:
                    raise ProtocolViolation(
                        f"frame of {payload_size} bytes exceeds the limit of {limit}"
                    )
                start = offset + HEADER.size
                if end < start + payload_size:
                    break
                payload = bytes(view[start : start + payload_size]) if payload_size else b""
                offset = start + payload_size
                events.extend(self._handle(kind, flags, stream_id, length, payload))
                if self.closed:
                    break
        except (ProtocolViolation, ValueError) as exc:
            self.close(CloseCode.PROTOCOL_ERROR)
            raise ProtocolViolation(f"peer broke the multiplexing protocol: {exc}") from None
        finally:
            self._inbound = bytearray() if self.closed else bytearray(view[offset:])
            view.release()
        return events

    def _handle(
        self, kind: int, flags: int, stream_id: int, length: int, payload: bytes
    ) -> list[Event]:
        if kind == _PING:
            if flags & _ACK:
                return [PongReceived(length)]
            self._frame(FrameType.PING, Flag.ACK, 0, length)
            return [PingReceived(length)]
        if kind == _GO_AWAY:
            self.abandon()
            return [ConnectionClosed(length)]
        if kind not in (_DATA, _WINDOW_UPDATE):
            raise ValueError(f"{kind} is not a valid FrameType")
        if stream_id == 0:
            raise ProtocolViolation(f"{FrameType(kind).name} frame on stream 0")
        events: list[Event] = []
        if flags & _SYN:
            events.extend(self._peer_opens(stream_id))
        stream = self._streams.get(stream_id)
        if stream is None:
            return events  # refused, or already reset or finished here: nothing to do
        if flags & _RST:
            del self._streams[stream_id]
            return [*events, StreamReset(stream_id)]
        if kind == _DATA and payload:
            events.append(self._data(stream_id, stream, payload))
        elif kind == _WINDOW_UPDATE and length:
            stream.send_window += length
            events.append(WindowUpdated(stream_id))
        if flags & _FIN and not stream.remote_closed:
            stream.remote_closed = True
            events.append(StreamEnded(stream_id))
            self._forget_if_done(stream_id)
        return events

    def _peer_opens(self, stream_id: int) -> list[Event]:
        if stream_id in self._streams or (stream_id % 2 == 1) == self.is_dialer:
            raise ProtocolViolation(f"stream {stream_id} cannot be opened by the peer")
        if self.preauth and self._peer_opened:
            raise ProtocolViolation("a second stream opened before authentication")
        self._peer_opened += 1
        if len(self._streams) >= self.limits.max_streams:
            self._frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0)
            return []
        self._streams[stream_id] = self._new_stream()
        return [StreamOpened(stream_id)]

    def _data(self, stream_id: int, stream: _Stream, payload: bytes) -> DataReceived:
        if stream.remote_closed:
            raise ProtocolViolation(f"data on stream {stream_id} after its end")
        if len(payload) > stream.receive_window:
            raise ProtocolViolation(f"peer overran the flow-control window of stream {stream_id}")
        stream.receive_window -= len(payload)
        return DataReceived(stream_id, payload)

    # ---- helpers ------------------------------------------------------------------------

    def _new_stream(self) -> _Stream:
        receive = self._preauth_window if self.preauth else self.limits.initial_window
        return _Stream(send_window=self.limits.initial_window, receive_window=receive)

    def _forget_if_done(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.local_closed and stream.remote_closed:
            del self._streams[stream_id]

    def _check_open(self) -> None:
        if self.closed:
            raise ProtocolViolation("the connection is closed")

    def _frame(
        self,
        kind: FrameType,
        flags: Flag,
        stream_id: int,
        length: int,
        payload: bytes | bytearray | memoryview = b"",
    ) -> None:
        self._outbound += HEADER.pack(kind, flags, stream_id, length)
        self._outbound += payload
