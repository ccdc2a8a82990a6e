"""What a running client reports through its control socket (``status``, ``tunnel list``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.tunnel import Tunnel

if TYPE_CHECKING:
    from cloudbridge_core.overlay.run import OverlayRun
    from cloudbridge_core.p2p.forward import PeerTunnel
    from cloudbridge_core.p2p.manager import PeerManager


@dataclass
class RunningClient:
    link: RelayLink
    tunnels: list[Tunnel | PeerTunnel]
    relay_host: str
    metrics_url: str | None = None
    mesh: PeerManager | None = None
    overlay: OverlayRun | None = None
    started: float = field(default_factory=time.time)

    def tunnels_document(self) -> dict[str, Any]:
        transport = self.link.status()["name"]
        return {
            "tunnels": [
                t.document()
                if not isinstance(t, Tunnel)
                else {
                    "name": t.spec.name,
                    "local": f"{t.spec.local_host}:{t.port}",
                    "target": t.spec.target,
                    "transport": transport,
                    "statistics": t.statistics.to_dict(),
                }
                for t in self.tunnels
            ]
        }

    def status_document(self) -> dict[str, Any]:
        transport = self.link.status()
        welcome = self.link.current.welcome if transport["name"] else None
        return {
            "state": transport["state"],
            "relay": {
                "host": self.relay_host,
                "tenant_id": welcome.tenant_id if welcome else None,
                "session_id": welcome.session_id if welcome else None,
                "token_source": self.link.tokens.where(),
                **self.link.relay_status(),
            },
            "transport": transport,
            "tunnels": self.tunnels_document()["tunnels"],
            "peers": self.mesh.status() if self.mesh else [],
            "overlay": self.overlay.document() if self.overlay else None,
            "metrics_url": self.metrics_url,
            "uptime_seconds": round(time.time() - self.started, 3),
            "last_error": transport["last_error"],
        }
