"""Receive credit that follows what the application has read, not what has arrived.

aioquic doubles a stream's (and the connection's) receive window whenever the peer has
used half of it, whether or not anyone read the data, so a slow reader would buffer
without bound. Here the peer gets more credit only as the application consumes bytes.
A stream the application abandons (reset, or closed unread) gives the connection back
what it received unread and what still arrives on it, or every reset would shrink the
connection's window for good.
"""

from __future__ import annotations

from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream


class BoundedQuicConnection(QuicConnection):
    """A :class:`QuicConnection` granting credit by consumption (see the module docstring).

    Connections are created by aioquic's server, so :func:`bound` converts one in place.
    """

    stream_window: int
    connection_window: int
    _consumed: dict[int, int]
    _consumed_total: int
    #: abandoned streams still receiving -> the bytes of each counted as consumed so far
    abandoned: dict[int, int]

    def credit(self, stream_id: int, count: int) -> bool:
        """Record ``count`` bytes read by the application; True when new credit is due."""
        consumed = self._consumed[stream_id] = self._consumed.get(stream_id, 0) + count
        granted = False
        stream = self._streams.get(stream_id)
        if stream is not None and consumed + self.stream_window - stream.max_stream_data_local >= (
            self.stream_window // 2
        ):
            stream.max_stream_data_local = consumed + self.stream_window
            granted = True
        return self._credit_connection(count) or granted

    def abandon(self, stream_id: int) -> bool:
        """The application reads no more of the stream: count what it received unread, and
        from now on what still arrives, as consumed; True when new credit is due."""
        self.abandoned[stream_id] = self._consumed.pop(stream_id, 0)
        return self.settle(stream_id)

    def settle(self, stream_id: int) -> bool:
        """Count what arrived on an abandoned stream since the last call (each of its
        events calls this); True when new credit is due."""
        counted = self.abandoned.pop(stream_id, None)
        stream = self._streams.get(stream_id)
        if counted is None or stream is None:
            return False
        received = stream.receiver.highest_offset  # the final size, once reset or finished
        if not stream.receiver.is_finished:
            self.abandoned[stream_id] = received
        return self._credit_connection(received - counted)

    def _credit_connection(self, count: int) -> bool:
        self._consumed_total += count
        limit = self._local_max_data
        if self._consumed_total + self.connection_window - limit.value >= (
            self.connection_window // 2
        ):
            limit.value = self._consumed_total + self.connection_window
            return True
        return False

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        highest = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0  # keeps aioquic's doubling rule from firing
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            stream.receiver.highest_offset = highest

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        used, limit.used = limit.used, 0  # the same for the connection-wide window
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used


def bound(
    connection: QuicConnection, *, stream_window: int, connection_window: int, max_streams: int
) -> BoundedQuicConnection:
    """Turn a fresh connection into a :class:`BoundedQuicConnection` (before its handshake)."""
    connection.__class__ = BoundedQuicConnection
    assert isinstance(connection, BoundedQuicConnection)
    connection.stream_window = stream_window
    connection.connection_window = connection_window
    connection._consumed = {}
    connection._consumed_total = 0
    connection.abandoned = {}
    connection._local_max_streams_bidi.value = max_streams
    connection._local_max_streams_bidi.sent = max_streams
    return connection
