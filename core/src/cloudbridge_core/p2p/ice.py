"""ICE through NAT (aioice): the core's own ``ice`` strategy — host and server-reflexive
candidates, so a direct or STUN path — and the helper the TURN plugin builds on.

The two peers trade ICE credentials and candidates over the relay's signalling, then run
connectivity checks; the nominated pair says which path it is: host to host is
``direct``, anything server-reflexive is ``stun``, a relayed candidate is ``turn``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aioice
from aioice.candidate import Candidate
from aioice.ice import get_host_addresses

from cloudbridge_core.errors import P2PConnectionFailed
from cloudbridge_core.log import get_logger
from cloudbridge_core.providers import PeerInfo, SignalChannel
from cloudbridge_core.quic.buffers import widen_buffers
from cloudbridge_core.quic.gso import DatagramSender

log = get_logger("p2p.ice")

CHECKS_TIMEOUT = 10.0
#: how long a close waits for a TURN server to confirm the allocation's deletion; one that
#: has gone away would be retried for about 10 s, and the allocation expires by itself
#: (RFC 8656 section 6), so the rest of the close goes on in the background
CLOSE_GRACE = 2.0

_closing: set[asyncio.Future[None]] = set()


async def close_connection(connection: aioice.Connection) -> None:
    """Close ``connection``, waiting at most :data:`CLOSE_GRACE` for it to finish."""
    closing = asyncio.ensure_future(connection.close())
    _closing.add(closing)
    closing.add_done_callback(_closed)
    await asyncio.wait({closing}, timeout=CLOSE_GRACE)


def _closed(closing: asyncio.Future[None]) -> None:
    _closing.discard(closing)
    error = None if closing.cancelled() else closing.exception()
    if error is not None:
        log.debug("ice_close_failed", error=repr(error))


class IcePath:
    def __init__(self, connection: aioice.Connection, kind: str, details: dict[str, Any]) -> None:
        self._connection = connection
        self.kind = kind
        self.endpoint = details["remote"]
        self.details = details

    async def send(self, datagram: bytes) -> None:
        await self._connection.sendto(datagram, 1)

    async def receive(self) -> bytes:
        data, _ = await self._connection.recvfrom()
        return data

    def deliver_to(self, receiver: Callable[[bytes], None]) -> None:
        """Hand each datagram to ``receiver`` as its socket delivers it, instead of through
        aioice's queue and :meth:`receive` (which then only says when the path ends)."""

        def data_received(data: bytes, component: int) -> None:
            receiver(data)

        self._connection.data_received = data_received  # type: ignore[method-assign]

    async def aclose(self) -> None:
        await close_connection(self._connection)


class UdpIcePath(IcePath):
    """A direct or STUN path: the nominated pair's own UDP socket, which sends without
    waiting, so a whole batch goes out at once (a TURN pair may have to bind a channel
    first: its ``send`` waits)."""

    def __init__(self, connection: aioice.Connection, kind: str, details: dict[str, Any]) -> None:
        super().__init__(connection, kind, details)
        # the buffers the relay's QUIC sockets get (quic/buffers.py), for the same bursts
        widen_buffers(connection._nominated[1].protocol.transport.get_extra_info("socket"))

    @property
    def punched(self) -> tuple[int, tuple[str, int]] | None:
        """The nominated pair's local UDP port and the peer's address: what an overlay
        sends from and to so that its packets take the same way through both NATs."""
        pair = self._connection._nominated.get(1)  # aioice keeps the pair private
        if pair is None:
            return None
        host, port = pair.remote_addr
        return pair.protocol.transport.get_extra_info("sockname")[1], (host, port)

    def send_batch(self, datagrams: Sequence[bytes]) -> None:
        pair = self._connection._nominated.get(1)  # aioice keeps the pair private
        if pair is None:
            raise ConnectionError("the ICE connection has ended")
        # in segmented sends where the kernel allows (UDP GSO), as the relay's QUIC does
        sender = DatagramSender(pair.protocol.transport, pair.protocol.error_received)
        sender.send((datagram, pair.remote_addr) for datagram in datagrams)


def stun_address(urls: Sequence[str]) -> tuple[str, int] | None:
    """The first ``stun:host:port`` (aioice takes one STUN server)."""
    for url in urls:
        match = re.fullmatch(r"stuns?:([^:\s]+)(?::(\d+))?", url)
        if match:
            return match.group(1), int(match.group(2) or 3478)
    return None


async def ice_path(peer: PeerInfo, signal: SignalChannel, **connection_options: Any) -> IcePath:
    """Run ICE with the peer over ``signal``; ``connection_options`` go to aioice."""
    connection = aioice.Connection(
        ice_controlling=signal.controlling, use_ipv6=False, **connection_options
    )
    try:
        overlay = getattr(signal, "overlay_addresses", None)
        await gather_candidates(connection, overlay() if callable(overlay) else set())
        await signal.send(
            {
                "ufrag": connection.local_username,
                "pwd": connection.local_password,
                "candidates": [c.to_sdp() for c in connection.local_candidates],
            }
        )
        answer = await signal.receive()
        connection.remote_username = str(answer["ufrag"])
        connection.remote_password = str(answer["pwd"])
        for sdp in answer["candidates"]:
            await connection.add_remote_candidate(Candidate.from_sdp(sdp))
        await connection.add_remote_candidate(None)
        try:
            await asyncio.wait_for(connection.connect(), CHECKS_TIMEOUT)
        except (ConnectionError, TimeoutError) as error:
            details = _checks(connection)
            raise P2PConnectionFailed(
                f"no candidate pair to {peer.name} worked ({error or 'timeout'})", details=details
            ) from None
    except BaseException:
        await close_connection(connection)
        raise
    kind, details = _nominated(connection)
    log.info("ice_connected", peer=peer.name, path=kind, remote=details["remote"])
    return (IcePath if kind == "turn" else UdpIcePath)(connection, kind, details)


async def gather_candidates(connection: aioice.Connection, excluded: set[str]) -> None:
    """aioice's ``gather_candidates``, without host candidates on ``excluded`` addresses
    (the tenant's overlay: a path to a peer must not run through it, and its STUN
    requests, which no router forwards, would hold the gathering up for seconds)."""
    if not excluded or connection._transport_policy != aioice.TransportPolicy.ALL:
        await connection.gather_candidates()
        return
    # what gather_candidates does, over the other addresses (aioice takes no filter)
    connection._local_candidates_start = True
    addresses = [a for a in get_host_addresses(use_ipv4=True, use_ipv6=False) if a not in excluded]
    for candidates in await asyncio.gather(
        *(
            connection.get_component_candidates(component=component, addresses=addresses)
            for component in connection._components
        )
    ):
        connection._local_candidates += candidates
    connection._local_candidates_end = True


def _nominated(connection: aioice.Connection) -> tuple[str, dict[str, Any]]:
    # aioice keeps the nominated pair private; it is the only record of which path won
    pair = connection._nominated[1]
    types = {pair.local_candidate.type, pair.remote_candidate.type}
    kind = "turn" if "relay" in types else "direct" if types == {"host"} else "stun"
    host, port = pair.remote_addr
    return kind, {
        "remote": f"{host}:{port}",
        "local_candidate": pair.local_candidate.type,
        "remote_candidate": pair.remote_candidate.type,
        **_checks(connection),
    }


def _checks(connection: aioice.Connection) -> dict[str, Any]:
    pairs = [
        {
            "local": f"{p.local_candidate.type} {p.local_addr[0]}:{p.local_addr[1]}",
            "remote": f"{p.remote_candidate.type} {p.remote_addr[0]}:{p.remote_addr[1]}",
            "state": p.state.name.lower(),
        }
        for p in connection._check_list
    ]
    local = sorted({c.type for c in connection.local_candidates})
    return {"candidate_pairs": pairs, "local_candidate_types": local}


class IceStrategy:
    """Direct and STUN: host and server-reflexive candidates (no TURN here)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._stun = stun_address(settings.get("stun_servers") or [])

    async def connect(self, peer: PeerInfo, signal: SignalChannel) -> IcePath:
        return await ice_path(peer, signal, stun_server=self._stun)
