"""Stateless reset (RFC 9000 10.3): a restarted relay tells a client at once that it holds
no state for the client's connection, where the client would otherwise wait for its idle
timeout or its next health check.

Each connection ID the relay issues carries a reset token ``HMAC-SHA256(key, connection
ID)[:16]`` from one secret key that the relay keeps in its state directory, so a restarted
relay computes the token of any connection ID the previous process issued. It answers a
short-header datagram for a connection ID it does not know with a stateless reset: random
bytes ending in that token. The client's session checks what arrives against the token of
the connection ID it sends to (:class:`~cloudbridge_core.quic.session.QuicSession`).
aioquic draws its tokens with ``os.urandom`` and neither sends nor detects resets.

Whoever knows the key can end any connection of the relay (connection IDs travel in the
clear): it is a secret, like the relay's TLS key. No sockets and no clocks here: callers
pass ``now``.
"""

from __future__ import annotations

import hmac
import math
import os

from aioquic.quic.connection import QuicConnection

from cloudbridge_core.quic.flow import BoundedQuicConnection

TOKEN_SIZE = 16
#: the shortest reset (the two fixed bits, 38 unpredictable ones, the token), and the
#: shortest valid short-header packet: anything this size or smaller is never answered
SMALLEST_RESET = 21
#: RFC 9000 10.3: a reset this long looks like any short packet; one answering a shorter
#: datagram is one byte shorter than it
RESET_SIZE = 43
#: stateless resets a relay sends a second, and at once after a quiet second. A security
#: limit: short-header datagrams forged with a victim's address get at most this many
#: answers, each shorter than what triggered it
RESET_RATE = 300.0


class StatelessResets:
    """One relay's reset tokens, and the resets it sends (see the module docstring)."""

    def __init__(self, key: bytes, *, rate: float = RESET_RATE) -> None:
        self._key = key
        self._rate = rate
        self._allowance = rate
        self._updated = -math.inf

    def token(self, connection_id: bytes) -> bytes:
        return hmac.digest(self._key, connection_id, "sha256")[:TOKEN_SIZE]

    def adopt(self, connection: QuicConnection) -> None:
        """Derive the tokens of a fresh relay connection (before its handshake, whose
        transport parameters carry the first one) and of the IDs it issues later; the
        connection is a bounded one (``bound_quic_connection``), and stays one."""
        assert isinstance(connection, BoundedQuicConnection)
        connection.__class__ = KeyedConnection
        assert isinstance(connection, KeyedConnection)
        connection.resets = self
        self.sign(connection)

    def sign(self, connection: QuicConnection) -> None:
        # deterministic: tokens already sent are rewritten with their own value
        for issued in connection._host_cids:
            issued.stateless_reset_token = self.token(issued.cid)

    def answer(self, datagram: bytes, connection_id: bytes, now: float) -> bytes | None:
        """The reset for ``datagram``, a short-header packet to ``connection_id``, which
        the relay does not know; None when it is too small to answer or over the rate.

        A reset is always shorter than the datagram it answers: two endpoints that answer
        each other's resets (one of them forged with the other's address) stop after a
        few rounds, when the datagrams reach :data:`SMALLEST_RESET`.
        """
        if len(datagram) <= SMALLEST_RESET:
            return None
        self._allowance = min(self._rate, self._allowance + (now - self._updated) * self._rate)
        self._updated = now
        if self._allowance < 1:
            return None
        self._allowance -= 1
        size = min(len(datagram) - 1, RESET_SIZE)
        unpredictable = bytearray(os.urandom(size - TOKEN_SIZE))
        unpredictable[0] = 0x40 | (unpredictable[0] & 0x3F)  # a short header's first bits
        return bytes(unpredictable) + self.token(connection_id)


class KeyedConnection(BoundedQuicConnection):
    """A relay connection whose reset tokens derive from the relay's key."""

    resets: StatelessResets

    def _replenish_connection_ids(self) -> None:
        # aioquic's only place for new connection IDs, before they are sent
        super()._replenish_connection_ids()
        self.resets.sign(self)
