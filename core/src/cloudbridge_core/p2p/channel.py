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

    @property
    def local_key(self) -> bytes:
        return self._identity.public_key_bytes

    async def send(self, message: Mapping[str, Any]) -> None:
        body = {"attempt": self.attempt, "data": dict(message)}
        await self._membership.send_signal(self._peer.peer_id, self.strategy, body)

    async def receive(self) -> Mapping[str, Any]:
        return await self.inbox.get()

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
