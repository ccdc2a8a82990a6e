"""TURN: both peers take relayed candidates from a TURN server and run ICE over them only,
so the path works whatever the NATs do with direct packets. Credentials never reach the
logs.

The credentials come, in this order of preference, from the relay (short-lived, issued to
this client's tenant: the TURN REST API scheme, see ``server.turn``) when the signal
channel offers them, and from ``p2p.ice.turn_servers`` (long-term credentials) otherwise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aioice
from cloudbridge_core.api import (
    IcePath,
    P2PConnectionFailed,
    PeerInfo,
    SignalChannel,
    TurnCredentials,
    ice_path,
)

URL = re.compile(
    r"(?P<scheme>turns?):(?P<host>[^:\s?]+)(?::(?P<port>\d+))?(?:\?transport=(?P<transport>udp|tcp))?"
)
#: relay-issued credentials are asked for again when they expire within this long, so an
#: allocation never starts with credentials about to be refused
RENEW_BEFORE = 60.0
#: with no TURN server configured, after the relay said it issues no credentials, the
#: strategy says it is unavailable (the peer manager then skips it) for this long before
#: one attempt asks the relay again (its ``server.turn`` may have been set meanwhile)
ASK_AGAIN_AFTER = 600.0
NO_SERVER = (
    "no TURN server: the relay issues no TURN credentials (server.turn) and "
    "p2p.ice.turn_servers is empty"
)


@dataclass(frozen=True)
class TurnServer:
    host: str
    port: int
    transport: str
    tls: bool
    username: str
    credential: str = field(repr=False)

    @classmethod
    def from_settings(cls, entry: Mapping[str, Any]) -> TurnServer:
        match = URL.fullmatch(str(entry["url"]))
        if match is None:
            raise P2PConnectionFailed(f"p2p.ice.turn_servers: not a TURN URL: {entry['url']!r}")
        tls = match["scheme"] == "turns"
        port = int(match["port"] or (5349 if tls else 3478))
        transport = "tcp" if tls else match["transport"] or "udp"
        return cls(
            match["host"],
            port,
            transport,
            tls,
            entry.get("username", ""),
            entry.get("credential", ""),
        )

    @classmethod
    def issued(cls, credentials: TurnCredentials) -> TurnServer:
        """The first of the relay's TURN URLs with the credentials it issued."""
        entry = {
            "url": credentials.urls[0],
            "username": credentials.username,
            "credential": credentials.credential,
        }
        return cls.from_settings(entry)


class TurnStrategy:
    def __init__(self, settings: Mapping[str, Any], clock: Callable[[], float] = time.time) -> None:
        self._servers = [TurnServer.from_settings(e) for e in settings["turn_servers"]]
        self._clock = clock
        self._issued: TurnCredentials | None = None
        #: when the relay last answered that it issues no TURN credentials
        self._declined_at: float | None = None

    def unavailable(self) -> str | None:
        """Why an attempt cannot work now (no server at all), or None: read by the peer
        manager before each attempt, so a strategy without a server is not attempted."""
        if self._servers or self._declined_at is None:
            return None
        if self._clock() - self._declined_at >= ASK_AGAIN_AFTER:
            return None
        return NO_SERVER

    async def connect(self, peer: PeerInfo, signal: SignalChannel) -> IcePath:
        server = await self._server(signal)
        return await ice_path(
            peer,
            signal,
            turn_server=(server.host, server.port),
            turn_username=server.username,
            turn_password=server.credential,
            turn_ssl=server.tls,
            turn_transport=server.transport,
            transport_policy=aioice.TransportPolicy.RELAY,
        )

    async def _server(self, signal: SignalChannel) -> TurnServer:
        issued = await self._relay_credentials(signal)
        if issued is not None:
            self._declined_at = None
            return TurnServer.issued(issued)
        if not self._servers:
            self._declined_at = self._clock()
            raise P2PConnectionFailed(NO_SERVER)
        return self._servers[0]

    async def _relay_credentials(self, signal: SignalChannel) -> TurnCredentials | None:
        """The relay's credentials for this tenant, renewed when they are about to expire;
        None when the channel does not offer them (a relay without ``server.turn``)."""
        fetch: Callable[[], Awaitable[TurnCredentials | None]] | None = getattr(
            signal, "turn_credentials", None
        )
        if fetch is None:
            return None
        if self._issued is None or self._issued.expires_at - self._clock() < RENEW_BEFORE:
            self._issued = await fetch()
        if self._issued is None or self._issued.expires_at <= self._clock():
            return None
        return self._issued
