"""The relay's QUIC server: aioquic's, answering datagrams of connections it does not know
with stateless resets, and forgetting an ended connection's ids without a scan."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import NetworkAddress
from cloudbridge_core.api import StatelessResets


class ConnectionIds(dict[bytes, QuicConnectionProtocol]):
    """aioquic's table of connection ids, also indexed by connection.

    aioquic forgets an ended connection's ids by scanning the whole table: with 1,000
    sessions ending together (a relay stopping) that took 4-5 s of the relay's CPU, while
    its clients found no relay to come back to."""

    def __init__(self) -> None:
        super().__init__()
        self._ids_of: defaultdict[QuicConnectionProtocol, set[bytes]] = defaultdict(set)

    def __setitem__(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        previous = self.get(cid)
        if previous is not None and previous is not protocol:
            self._unindex(cid, previous)
        super().__setitem__(cid, protocol)
        self._ids_of[protocol].add(cid)

    def __delitem__(self, cid: bytes) -> None:
        self._unindex(cid, self[cid])
        super().__delitem__(cid)

    def clear(self) -> None:
        super().clear()
        self._ids_of.clear()

    def forget(self, protocol: QuicConnectionProtocol) -> None:
        """Drop every id of ``protocol``'s connection."""
        for cid in self._ids_of.pop(protocol, ()):
            super().__delitem__(cid)

    def _unindex(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        ids = self._ids_of.get(protocol)
        if ids is not None:
            ids.discard(cid)
            if not ids:
                del self._ids_of[protocol]


class RelayQuicServer(QuicServer):
    """aioquic's server with :class:`ConnectionIds`, answering a short-header datagram for
    a connection it does not know (one a previous process of the relay held) with a
    stateless reset."""

    def __init__(self, resets: StatelessResets, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._protocols: ConnectionIds = ConnectionIds()
        self._resets = resets

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        datagram = cast("bytes", data)
        if datagram and not datagram[0] & 0x80:  # a short header: no new connection
            connection_id = datagram[1 : 1 + self._configuration.connection_id_length]
            if connection_id not in self._protocols:
                reset = self._resets.answer(datagram, connection_id, self._loop.time())
                if reset is not None:
                    assert self._transport is not None  # it is receiving
                    self._transport.sendto(reset, addr)
                return
        super().datagram_received(data, addr)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self._protocols.forget(protocol)
