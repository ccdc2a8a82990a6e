"""A dropped direct path that carries again is found by the probes of the peer that waits
for acknowledgements, and taken back when the other peer answers over it (issue 16: both
NATs forgot their mappings; the answering peer's relay session is deaf until it sends).

Two :class:`PeerSession` objects on loopback, each with a STUN-like UDP path that can be
cut (the NAT lets nothing through) and a DERP-like path that loses everything (the relay
session of the other peer is deaf), so nothing but a probe over the dropped path can
bring the session back. The waits are hang guards; nothing here is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.session import PeerSession
from cloudbridge_core.providers import Stream
from cloudbridge_core.testing.loopback_paths import BatchingUdpPath, peer_info, udp_paths

pytestmark = pytest.mark.timeout(60)


class CuttableStunPath(BatchingUdpPath):
    """A UDP path that sends without waiting, as ICE's are; while ``cut``, whatever it
    sends is lost (a NAT without the mapping)."""

    kind = "stun"
    cut = False

    def send_batch(self, datagrams: Sequence[bytes]) -> None:
        if not self.cut:
            super().send_batch(datagrams)

    async def send(self, datagram: bytes) -> None:
        self.send_batch([datagram])


class DeafDerpPath:
    """A DERP path into a relay session that delivers nothing."""

    kind = "derp"
    endpoint = "relay"

    async def send(self, datagram: bytes) -> None:
        """Lost."""

    async def receive(self) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("never")

    async def aclose(self) -> None:
        """Nothing to close."""


@asynccontextmanager
async def peers(
    *, deaf_derp: bool
) -> AsyncIterator[tuple[PeerSession, PeerSession, CuttableStunPath, CuttableStunPath]]:
    """The peer that opens streams (``waiting``), the one that answers, and the STUN paths
    from each to the other; both on ``stun``, with a deaf DERP path beside it if asked."""
    one, two = DeviceIdentity.create(), DeviceIdentity.create()
    waiting = PeerSession(one, peer_info(two), one.peer_id < two.peer_id, echo)
    answering = PeerSession(two, peer_info(one), two.peer_id < one.peer_id, echo)
    to_answering, to_waiting = await udp_paths(CuttableStunPath)
    try:
        for session, stun in ((waiting, to_answering), (answering, to_waiting)):
            if deaf_derp:
                session.add_path(DeafDerpPath())
            session.add_path(stun)
        await waiting.wait_quic(10)
        await answering.wait_quic(10)
        yield waiting, answering, to_answering, to_waiting
    finally:
        await waiting.aclose()
        await answering.aclose()


async def until(condition: Callable[[], bool], within: float = 20) -> None:
    """Until ``condition`` holds (``within`` is a hang guard)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the sessions signal none of these
            await asyncio.sleep(0.05)


async def echo(stream: Stream) -> None:
    while data := await stream.read():
        await stream.write(data)
    await stream.close_write()


def test_a_dropped_path_that_carries_again_is_found_by_probes_and_taken_back() -> None:
    asyncio.run(probes_find_the_dropped_path())


async def probes_find_the_dropped_path() -> None:
    async with peers(deaf_derp=True) as (waiting, answering, to_answering, to_waiting):
        assert (waiting.current, answering.current) == ("stun", "stun")
        stream = await waiting.open_stream()
        await stream.write(b"before")
        assert await stream.read() == b"before"
        assert waiting.probe_dropped() == []  # nothing dropped, nothing waiting
        answered = answering._protocol
        assert answered is not None
        await until(lambda: not answered.waits_for_acks())  # it has nothing to resend

        to_answering.cut = to_waiting.cut = True  # both NATs forget their mappings
        await stream.write(b"x" * 50_000)
        protocol = waiting._protocol
        assert protocol is not None
        await until(protocol.waits_for_acks)
        assert waiting.check_stalled(0.0) == "stun"
        assert waiting.current == "derp"  # deaf: only a probe over stun can help now

        to_answering.cut = to_waiting.cut = False  # the mappings are back (consent checks)
        # probes start once the peer has been silent on every path for FOLLOW_AFTER
        await until(lambda: waiting.probe_dropped() == ["stun"])
        await until(lambda: waiting.current == "stun")
        assert waiting.changes[-1]["reason"] == "the peer speaks over stun"
        assert "stun" not in waiting.suspect
        assert answering.current == "stun"  # it never had to move

        received = b""
        while len(received) < 50_000:
            received += await stream.read()
        assert received == b"x" * 50_000  # nothing lost on the way
        await stream.close_write()


def test_no_probes_while_the_current_path_delivers() -> None:
    """A dropped path gets no probes while the peer is heard (no flapping back to it)."""
    asyncio.run(no_probes_while_heard())


async def no_probes_while_heard() -> None:
    async with peers(deaf_derp=False) as (waiting, _, _, _):
        stream = await waiting.open_stream()
        waiting.suspect.add("turn")  # a dropped path of another kind, not in the session
        for _ in range(20):
            await stream.write(b"y" * 10_000)
            assert waiting.probe_dropped() == []
            received = b""
            while len(received) < 10_000:
                received += await stream.read()
        assert waiting.current == "stun"
        await stream.close_write()
