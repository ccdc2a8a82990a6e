"""TURN: both peers take relayed candidates from a TURN server (long-term credentials from
``p2p.ice.turn_servers``) and run ICE over them only, so the path works whatever the
NATs do with direct packets. Credentials never reach the logs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aioice
from cloudbridge_core.api import IcePath, P2PConnectionFailed, PeerInfo, SignalChannel, ice_path

URL = re.compile(
    r"(?P<scheme>turns?):(?P<host>[^:\s?]+)(?::(?P<port>\d+))?(?:\?transport=(?P<transport>udp|tcp))?"
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


class TurnStrategy:
    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._servers = [TurnServer.from_settings(e) for e in settings["turn_servers"]]

    async def connect(self, peer: PeerInfo, signal: SignalChannel) -> IcePath:
        if not self._servers:
            raise P2PConnectionFailed("no TURN server configured (p2p.ice.turn_servers)")
        server = self._servers[0]
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
