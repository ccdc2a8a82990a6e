"""What joining the mesh takes, as the command line gives it (light: no QUIC or ICE
imported until the mesh is actually joined)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloudbridge_core.p2p.identity import DeviceIdentity

if TYPE_CHECKING:
    from cloudbridge_core.providers import Overlay

#: which paths a client may use to reach its peers
MODES = ("p2p-first", "relay-only", "p2p-only")


@dataclass(frozen=True)
class PeerTunnelSpec:
    local_port: int
    peer: str
    remote_port: int
    local_host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"peer:{self.peer}:{self.remote_port}"


@dataclass
class MeshSetup:
    """Joining the tenant's mesh: with which identity, which paths, which peer forwards,
    and the overlay (its plugin's provider, this device's overlay key) when it is on."""

    identity: DeviceIdentity
    mode: str = "p2p-first"
    forwards: list[PeerTunnelSpec] = field(default_factory=list)
    overlay: Overlay | None = None
    overlay_key: str = field(default="", repr=False)
