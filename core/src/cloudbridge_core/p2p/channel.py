"""What one attempt of one NAT strategy towards one peer gets to work with (the
``SignalChannel`` of :mod:`cloudbridge_core.providers`)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import Any

from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.protocol.messages import TurnCredentials
from cloudbridge_core.providers import PeerInfo, Stream


class AttemptChannel:
    """Signals of one attempt travel as ``signal {kind: strategy, body: {attempt, data}}``."""

    def __init__(
        self,
        membership: Membership,
        identity: DeviceIdentity,
        peer: PeerInfo,
        strategy: str,
        attempt: int,
        controlling: bool,
    ) -> None:
        self._membership = membership
        self._identity = identity
        self._peer = peer
        self._peer_key = base64.b64decode(peer.public_key)
        self.strategy = strategy
        self.attempt = attempt
        self._controlling = controlling
        self.inbox: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()

    @property
    def controlling(self) -> bool:
        return self._controlling

    def overlay_addresses(self) -> set[str]:
        """The tenant's overlay addresses: no path to the peer may use them."""
        return self._membership.overlay_addresses()

    @property
    def local_key(self) -> bytes:
        return self._identity.public_key_bytes

    async def send(self, message: Mapping[str, Any]) -> None:
        data = without_overlay(message, self._membership.overlay_addresses())
        body = {"attempt": self.attempt, "data": data}
        await self._membership.send_signal(self._peer.peer_id, self.strategy, body)

    async def receive(self) -> Mapping[str, Any]:
        return without_overlay(await self.inbox.get(), self._membership.overlay_addresses())

    def seal(self, packet: bytes) -> bytes:
        return self._identity.seal(self._peer_key, packet)

    def open(self, sealed: bytes) -> bytes:
        return self._identity.open(self._peer_key, sealed)

    async def open_relay_stream(self, target: str) -> Stream:
        return await self._membership.open_relay_stream(target)

    async def turn_credentials(self) -> TurnCredentials | None:
        """The TURN credentials the relay issued this device's tenant, unexpired; None from a
        relay without ``server.turn`` (the ``turn`` strategy then uses its own settings)."""
        return await self._membership.turn_credentials()


def without_overlay(message: Mapping[str, Any], overlay: set[str]) -> dict[str, Any]:
    """``message`` without the ICE candidates (``candidates``, SDP) and TCP endpoints
    (``endpoints``, ``host:port``) on an overlay address of the tenant: a path to a peer
    must never run through the overlay that paths to peers carry."""
    found = dict(message)
    if not overlay:
        return found
    if isinstance(found.get("candidates"), list):
        found["candidates"] = [
            c for c in found["candidates"] if not (isinstance(c, str) and _sdp_host(c) in overlay)
        ]
    if isinstance(found.get("endpoints"), list):
        found["endpoints"] = [
            e
            for e in found["endpoints"]
            if not (isinstance(e, str) and e.rpartition(":")[0].strip("[]") in overlay)
        ]
    return found


def _sdp_host(candidate: str) -> str:
    """The address of an SDP candidate (``candidate:F 1 udp PRIO ADDRESS PORT typ ...``)."""
    fields = candidate.split()
    return fields[4] if len(fields) > 4 else ""
