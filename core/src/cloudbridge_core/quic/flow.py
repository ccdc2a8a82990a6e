"""Receive credit: a stream's follows what the application has read, the connection's
what has arrived.

aioquic doubles a stream's (and the connection's) receive window whenever the peer has
used half of it, whether or not anyone read the data, so a slow reader would buffer
without bound. Here a stream gets more credit only as the application consumes its bytes:
that bounds what each stream buffers, and ``max_streams`` how many do. The connection's
window moves on as bytes arrive (or a reset stream's final size says they never will):
were it to follow reads as well, a few streams whose readers stall (downloads nobody reads
yet) would use it up and starve every other stream of the session, new ones included.
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

    def credit(self, stream_id: int, count: int) -> bool:
        """Record ``count`` bytes of the stream read by the application; True when new
        credit is due."""
        consumed = self._consumed[stream_id] = self._consumed.get(stream_id, 0) + count
        stream = self._streams.get(stream_id)
        if stream is not None and consumed + self.stream_window - stream.max_stream_data_local >= (
            self.stream_window // 2
        ):
            stream.max_stream_data_local = consumed + self.stream_window
            return True
        return False

    def forget(self, stream_id: int) -> None:
        """The application reads no more of the stream."""
        self._consumed.pop(stream_id, None)

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
        if limit.used + self.connection_window - limit.value >= self.connection_window // 2:
            limit.value = limit.used + self.connection_window
        used, limit.used = limit.used, 0  # keeps aioquic's doubling rule from firing
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
    connection._local_max_streams_bidi.value = max_streams
    connection._local_max_streams_bidi.sent = max_streams
    return connection
