"""Peer streams through the relay: two peers of one tenant each open a stream with
``peer_splice`` naming the other and the same attempt, and the relay copies bytes between
the two streams. The peers run mutual TLS end to end over it (their certificates pinned
through the mesh), so the relay carries ciphertext it can neither read nor forge.

Both peers open, rather than the relay opening a stream to the second one: every
transport lets a client open streams, not all let the relay open them (gRPC), and the
relay learns each side's identity from its own session's mesh membership. Peers are
looked up only within the opener's tenant, so a request naming another tenant's peer is
refused as "unknown" and nothing is spliced.

The copy keeps what each stream means: an EOF is a half-close on the other stream, a
reset or a lost session resets the other stream, and every write waits for the other
side's window (flow control end to end, no queue of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

from cloudbridge_core.errors import (
    ConnectionTimeout,
    LimitExceeded,
    TargetUnreachable,
    TransportError,
)
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Stream
from cloudbridge_core.relay.mesh import Member, Mesh
from cloudbridge_core.wire import MessageStream

#: streams one member may have waiting for their peers at once (a security limit)
MAX_WAITING_PER_MEMBER = 8

_Key = tuple[str, str, str, int]  # tenant, opener, peer, attempt


@dataclass(eq=False)
class Arrival:
    """One side's stream, its header reader (which may hold the first bytes after the
    request), and what tells the side that did not run the copy that it is over (True: it
    was joined; False: the first side had given up)."""

    stream: Stream
    header: MessageStream
    over: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class Pairing:
    """Two streams to join: ``first`` waited, ``second`` came for it."""

    first: Arrival
    second: Arrival
    moved: list[int] = field(default_factory=lambda: [0, 0])


class Splicer:
    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._waiting: dict[_Key, asyncio.Future[Arrival]] = {}
        self._waiting_per_member: Counter[tuple[str, str]] = Counter()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def meet(
        self, member: Member, request: messages.PeerSplice, arrival: Arrival, within: float
    ) -> Pairing | None:
        """The pairing for the first of the two to arrive, once the second has come (the
        caller then runs :meth:`join`); None for the second, after the copy has ended.

        Raises ``TargetUnreachable`` for a peer unknown in the member's tenant (others'
        included), ``LimitExceeded`` past :data:`MAX_WAITING_PER_MEMBER` or for an attempt
        already waiting, ``ConnectionTimeout`` when the peer does not come ``within``."""
        tenant = member.tenant_id
        self._check_peer(member, request.peer_id)
        theirs = (tenant, request.peer_id, member.peer_id, request.attempt)
        partner = self._waiting.pop(theirs, None)
        if partner is not None and not partner.done():
            partner.set_result(arrival)
            if not await asyncio.shield(arrival.over):
                raise TargetUnreachable("the peer's stream went away")
            return None
        key = (tenant, member.peer_id, request.peer_id, request.attempt)
        if key in self._waiting:
            self._mesh.rejected("limit", tenant, "peer_splice: too many waiting")
            raise LimitExceeded("too many peer_splice streams waiting for their peers")
        self.reserve(member, request.peer_id)
        came: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self._waiting[key] = came
        second: Arrival | None = None
        try:
            async with asyncio.timeout(within):
                second = await came
        except TimeoutError:
            self._mesh.rejected("timeout", tenant, "peer_splice: the peer did not come")
            raise ConnectionTimeout(f"the peer did not come within {within:g}s") from None
        finally:
            if self._waiting.get(key) is came:
                del self._waiting[key]
            self.release(tenant, member.peer_id)
            if second is None and came.done() and not came.cancelled():
                # it came just as this side gave up
                came.result().over.set_result(False)
        return Pairing(arrival, second)

    def reserve(self, member: Member, peer_id: str) -> None:
        """A place for one of ``member``'s splices waiting for ``peer_id`` (a stream here,
        or a ticket and its connection in ``relay/tickets.py``); :meth:`release` it.

        Raises ``TargetUnreachable`` for a peer unknown in the member's tenant (others'
        included), ``LimitExceeded`` past :data:`MAX_WAITING_PER_MEMBER`."""
        self._check_peer(member, peer_id)
        mine = (member.tenant_id, member.peer_id)
        if self._waiting_per_member[mine] >= MAX_WAITING_PER_MEMBER:
            self._mesh.rejected("limit", member.tenant_id, "peer splice: too many waiting")
            raise LimitExceeded("too many peer splices waiting for their peers")
        self._waiting_per_member[mine] += 1

    def release(self, tenant: str, peer_id: str) -> None:
        mine = (tenant, peer_id)
        self._waiting_per_member[mine] -= 1
        if self._waiting_per_member[mine] <= 0:
            del self._waiting_per_member[mine]

    def _check_peer(self, member: Member, peer_id: str) -> None:
        tenant = member.tenant_id
        if peer_id == member.peer_id or self._mesh.member(tenant, peer_id) is None:
            self._mesh.rejected("unknown_peer", tenant, "peer splice to an unknown peer")
            raise TargetUnreachable("no such peer in the mesh")

    async def join(self, pairing: Pairing, buffer_size: int) -> bool:
        """Accept both streams and copy between them until both directions have ended;
        whether they ended cleanly (else both were reset). Never raises for a side's
        failure; tells the second side it is over, whatever happens."""
        first, second = pairing.first, pairing.second
        clean = False
        try:
            await first.header.send(messages.Accept())
            await second.header.send(messages.Accept())
            clean = await _copy_both(pairing, buffer_size)
        except TransportError:
            pass
        finally:
            if not clean:
                await asyncio.gather(first.stream.reset(), second.stream.reset())
            if not second.over.done():
                second.over.set_result(True)
        return clean


async def _copy_both(pairing: Pairing, buffer_size: int) -> bool:
    first, second = pairing.first, pairing.second

    async def copy(source: Arrival, sink: Arrival, direction: int) -> None:
        early = source.header.take_buffered()
        if early:
            await sink.stream.write(early)
            pairing.moved[direction] += len(early)
        while data := await source.stream.read(buffer_size):
            await sink.stream.write(data)
            pairing.moved[direction] += len(data)
        await sink.stream.close_write()

    tasks = [
        asyncio.create_task(copy(first, second, 0)),
        asyncio.create_task(copy(second, first, 1)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and (failure := task.exception()) is not None:
                raise failure
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for arrival in (first, second):
        with contextlib.suppress(TransportError):
            await arrival.stream.aclose()
    return True
