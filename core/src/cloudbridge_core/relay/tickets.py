"""Peers' raw connections through the relay: tickets, and the copy between two sockets.

Over a relay stream (``relay/splice.py``) every byte of a peer session is encrypted three
times (the peers' TLS, then each relay session's) and framed by four multiplexers. Here
a peer asks over its authenticated session for a ticket (``peer_ticket`` naming the other
peer and the attempt), opens a plain TCP connection to the relay's TLS port and sends
the ticket in a preamble (``protocol/preamble.py``); the TLS listener hands the
connection over (``transports/sniff.py``) and the relay joins it to the connection the
other peer made with its own ticket for the same pair and attempt. The peers' mutual TLS
then runs on the sockets themselves: the relay copies ciphertext it can neither read nor
forge, and only once.

A ticket is random (256 bits), single-use, bound to the asker's tenant, the pair and the
attempt, and expires after :data:`TICKET_TTL`; peers are looked up only within the
asker's tenant, as ``peer_splice`` does. Tickets not yet used and connections waiting for
their partner count against the per-member cap of waiting splices
(:data:`~cloudbridge_core.relay.splice.MAX_WAITING_PER_MEMBER`). Someone who steals a
ticket on the wire can take the place of its peer's connection, but not finish the TLS
handshake with the other peer: the attempt fails, nothing more.

The copy runs in the event loop's callbacks (a protocol per socket writing to the other's
transport): no task and no user-space buffer of its own beyond the transports' bounded
write buffers, whose high-water mark pauses reading the other socket. An EOF is a
half-close on the other socket; a reset, a lost connection or the relay closing resets
both (an RST, never a FIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from cloudbridge_core.errors import LimitExceeded, ServerUnavailable
from cloudbridge_core.log import get_logger
from cloudbridge_core.protocol import messages
from cloudbridge_core.protocol.preamble import TICKET_SIZE, ticket_text
from cloudbridge_core.pump import abort, keep_alive
from cloudbridge_core.relay.mesh import Member, Mesh
from cloudbridge_core.relay.metrics import RelayMetrics
from cloudbridge_core.relay.splice import Splicer

log = get_logger("relay.tickets")

#: how long a ticket may wait for its connection (a security limit)
TICKET_TTL = 10.0
#: raw splices one member may have copying at once, whoever asked first; no ticket past
#: it (a security limit: each holds two descriptors; a peer needs one per peer it
#: reaches over DERP, at most ``p2p.max_connections``, 100 by default)
MAX_SPLICED_PER_MEMBER = 256
#: bytes a socket's write buffer may hold before the other socket is no longer read
HIGH_WATER = 256 * 1024
#: a spliced peer that vanishes without a FIN or RST is noticed by the kernel
KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 45000}

_Key = tuple[str, str, str, int]  # tenant, holder, peer, attempt


@dataclass(eq=False)
class _Issued:
    key: _Key
    expiry: asyncio.TimerHandle


class TicketDesk:
    """Issues tickets and splices the connections that bring them (``RawSplices`` of
    :mod:`cloudbridge_core.transports.sniff`). ``within`` is how long a connection waits
    for its partner (the relay's ``handshake_timeout``); ``activity`` hears +1 and -1 as
    splices start and end."""

    def __init__(
        self,
        mesh: Mesh,
        splicer: Splicer,
        metrics: RelayMetrics,
        within: Callable[[], float],
        activity: Callable[[int], None],
    ) -> None:
        self._mesh = mesh
        self._splicer = splicer
        self._metrics = metrics
        self._within = within
        self._activity = activity
        #: the TLS listener's port, once one hands raw connections over
        self.port: int | None = None
        self._issued: dict[bytes, _Issued] = {}
        self._waiting: dict[_Key, asyncio.Future[socket.socket]] = {}
        self._spliced: Counter[tuple[str, str]] = Counter()

    @property
    def waiting(self) -> int:
        """Connections waiting for their partner's."""
        return len(self._waiting)

    @property
    def outstanding(self) -> int:
        """Tickets issued and not yet used or expired, and connections waiting."""
        return len(self._issued) + len(self._waiting)

    def listening(self, port: int) -> None:
        self.port = port

    def refused(self, reason: str) -> None:
        self._metrics.p2p_rejected.labels(reason).inc()
        log.info("raw_splice_refused", reason=reason)

    def issue(self, member: Member, request: messages.PeerTicket) -> messages.Ticket:
        """A ticket for ``member``'s connection to ``request.peer_id`` for its attempt.

        Raises ``ServerUnavailable`` without a TLS listener to take the connection,
        ``LimitExceeded`` past :data:`MAX_SPLICED_PER_MEMBER`, and what
        :meth:`Splicer.reserve` raises (an unknown peer, the waiting cap)."""
        if self.port is None:
            raise ServerUnavailable("the relay takes no raw connections (no TLS listener)")
        if self._spliced[(member.tenant_id, member.peer_id)] >= MAX_SPLICED_PER_MEMBER:
            self._mesh.rejected("limit", member.tenant_id, "peer_ticket: too many spliced")
            raise LimitExceeded("too many raw peer splices at once")
        self._splicer.reserve(member, request.peer_id)
        ticket = secrets.token_bytes(TICKET_SIZE)
        key = (member.tenant_id, member.peer_id, request.peer_id, request.attempt)
        expiry = asyncio.get_running_loop().call_later(TICKET_TTL, self._expired, ticket)
        self._issued[ticket] = _Issued(key, expiry)
        return messages.Ticket(ticket_text(ticket), self.port)

    def _expired(self, ticket: bytes) -> None:
        issued = self._issued.pop(ticket, None)
        if issued is not None:
            self._splicer.release(issued.key[0], issued.key[1])
            self._mesh.rejected("timeout", issued.key[0], "peer_ticket: not used in time")

    async def redeem(self, ticket: bytes, connection: socket.socket) -> None:
        """Splice ``connection`` to its partner's, or close it: a ticket unknown, expired or
        used already (counted as ``bad_ticket``), or a partner that does not come
        within ``within`` (counted as ``timeout``). Returns once it is closed."""
        issued = self._issued.pop(ticket, None)
        if issued is None:
            self.refused("bad_ticket")
            abort(connection)
            return
        issued.expiry.cancel()
        tenant, holder, peer, attempt = issued.key
        try:
            partner = self._waiting.pop((tenant, peer, holder, attempt), None)
            if partner is not None and not partner.done():
                partner.set_result(connection)  # the first to come runs the copy
                return
            if issued.key in self._waiting:  # a second ticket of the holder's, same attempt
                self._mesh.rejected("limit", tenant, "peer_ticket: the attempt already waits")
                abort(connection)
                return
            other = await self._wait(issued.key, connection)
        finally:
            self._splicer.release(tenant, holder)
        if other is not None:
            members = [(tenant, holder), (tenant, peer)]
            self._spliced.update(members)
            try:
                await self._splice(tenant, connection, other)
            finally:
                self._spliced.subtract(members)
                for key in members:
                    if self._spliced[key] <= 0:
                        del self._spliced[key]

    async def _wait(self, key: _Key, connection: socket.socket) -> socket.socket | None:
        came: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._waiting[key] = came
        try:
            async with asyncio.timeout(self._within()):
                return await came
        except TimeoutError:
            self._mesh.rejected("timeout", key[0], "peer_ticket: the peer did not come")
            abort(connection)
            return None
        except BaseException:  # the relay closing: neither connection outlives it
            abort(connection)
            if came.done() and not came.cancelled():
                abort(came.result())
            raise
        finally:
            if self._waiting.get(key) is came:
                del self._waiting[key]

    async def _splice(self, tenant: str, first: socket.socket, second: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        splice = _Splice(first, second, loop.create_future())
        self._activity(1)
        try:
            for side in splice.sides:
                keep_alive(side.sock, KEEPALIVE)
                await loop.connect_accepted_socket(side.itself, side.sock)
            splice.start()
            await splice.finished
        except BaseException:  # a socket gone before it was wrapped, or the relay closing
            splice.abort()
            raise
        finally:
            self._activity(-1)
            self._metrics.derp_bytes.inc(sum(splice.moved))
        log.debug("raw_splice_closed", tenant_id=tenant, moved=splice.moved, clean=splice.clean)


class _Side(asyncio.Protocol):
    """One socket of a splice: what it reads goes to the other's transport."""

    def __init__(self, splice: _Splice, index: int, sock: socket.socket) -> None:
        self._splice = splice
        self._index = index
        self.sock = sock
        self.transport: asyncio.Transport | None = None
        self.ended = False  # its EOF came (and was passed on once the splice started)
        self.lost = False
        self._early: list[bytes] = []  # read before the other socket was ready

    def itself(self) -> _Side:
        """The protocol factory of its transport."""
        return self

    @property
    def other(self) -> _Side:
        return self._splice.sides[1 - self._index]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self._splice.moved[self._index] += len(data)
        other = self.other.transport
        if not self._splice.started or other is None:
            self._early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        other.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        if self._splice.started:
            self._pass_eof()
        return True  # half-closed: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._splice.side_lost(exc)

    def pause_writing(self) -> None:
        other = self.other.transport
        if other is not None and not other.is_closing():
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other.transport
        if other is not None and not other.is_closing():
            other.resume_reading()

    def start(self) -> None:
        """Pass on what came before both sockets were ready, and read on."""
        other = self.other.transport
        assert self.transport is not None
        assert other is not None
        for data in self._early:
            other.write(data)
        self._early.clear()
        if self.ended:
            self._pass_eof()
        elif not self.transport.is_closing() and other.get_write_buffer_size() <= HIGH_WATER:
            self.transport.resume_reading()  # else the other's resume_writing will

    def _pass_eof(self) -> None:
        other = self.other.transport
        if other is not None and not other.is_closing():
            with contextlib.suppress(OSError, RuntimeError):  # already reset
                other.write_eof()
        self._splice.maybe_done()

    def abort(self) -> None:
        """Close with an RST (the transport closes the socket it wraps)."""
        if self.transport is None:
            abort(self.sock)
            return
        with contextlib.suppress(OSError):  # already reset by the peer
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class _Splice:
    def __init__(
        self, first: socket.socket, second: socket.socket, finished: asyncio.Future[None]
    ) -> None:
        self.finished = finished
        self.sides = (_Side(self, 0, first), _Side(self, 1, second))
        self.moved = [0, 0]
        self.started = False
        self.clean = False

    def start(self) -> None:
        self.started = True
        for side in self.sides:
            side.start()

    def maybe_done(self) -> None:
        """Both EOFs passed on: close both once their buffers are written."""
        if all(side.ended for side in self.sides) and not self.finished.done():
            self.clean = True
            for side in self.sides:
                if side.transport is not None:
                    side.transport.close()

    def side_lost(self, exc: Exception | None) -> None:
        if not self.clean or exc is not None:
            self.clean = False
            self.abort()
        if all(side.lost for side in self.sides) and not self.finished.done():
            self.finished.set_result(None)

    def abort(self) -> None:
        for side in self.sides:
            side.abort()
