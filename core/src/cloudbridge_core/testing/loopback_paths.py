"""Peer paths over loopback UDP for tests of :class:`~cloudbridge_core.p2p.session.PeerSession`:
what a NAT strategy would hand it, without the strategy (one socket each side)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.providers import PeerInfo


class Inbox(asyncio.DatagramProtocol):
    """A socket's datagrams: queued, or handed to ``deliver`` as they arrive."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.deliver: Callable[[bytes], None] = self.received.put_nowait

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.deliver(data)


class UdpPath:
    """A direct path: one UDP socket on loopback, sending to the other's."""

    kind = "direct"

    def __init__(
        self, transport: asyncio.DatagramTransport, protocol: Inbox, remote: tuple[str, int]
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._remote = remote
        self.endpoint = f"{remote[0]}:{remote[1]}"

    async def send(self, datagram: bytes) -> None:
        self._transport.sendto(datagram, self._remote)

    async def receive(self) -> bytes:
        return await self._protocol.received.get()

    async def aclose(self) -> None:
        self._transport.close()


class BatchingUdpPath(UdpPath):
    """The same path sending a batch without waiting and handing over each datagram as it
    arrives, as ICE's UDP paths do."""

    def send_batch(self, datagrams: Sequence[bytes]) -> None:
        for datagram in datagrams:
            self._transport.sendto(datagram, self._remote)

    def deliver_to(self, receiver: Callable[[bytes], None]) -> None:
        self._protocol.deliver = receiver


P = TypeVar("P", bound=UdpPath)


async def udp_paths(kind: type[P]) -> tuple[P, P]:
    """Two paths of ``kind``, each the other's far end."""
    loop = asyncio.get_running_loop()
    ends = [await loop.create_datagram_endpoint(Inbox, local_addr=("127.0.0.1", 0)) for _ in "ab"]
    (a, a_protocol), (b, b_protocol) = ends
    return (
        kind(a, a_protocol, b.get_extra_info("sockname")),
        kind(b, b_protocol, a.get_extra_info("sockname")),
    )


def peer_info(identity: DeviceIdentity) -> PeerInfo:
    """What the mesh would say of the device with ``identity``."""
    certificate = identity.ca.certificate.decode()
    return PeerInfo(identity.peer_id, "other", identity.public_key, certificate=certificate)
