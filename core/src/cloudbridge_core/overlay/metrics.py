"""The client's overlay metrics (``cloudbridge_client_overlay_`` prefix, base units)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

#: how a peer's overlay packets travel: ``kernel`` (a punched direct or STUN path, no
#: Python in between), ``proxy`` (TURN, DERP: through the client), ``none`` (no path yet)
ROUTES = ("kernel", "proxy", "none")


class OverlayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "cloudbridge_client_overlay_up",
            "1 while this device's overlay interface is up.",
            registry=registry,
        )
        self.peers = Gauge(
            "cloudbridge_client_overlay_peers",
            "Overlay peers by how their packets travel: kernel (a punched direct or STUN"
            " path), proxy (TURN, DERP: through the client), none (no path yet).",
            ["route"],
            registry=registry,
        )
        self.proxied_bytes = Counter(
            "cloudbridge_client_overlay_proxied_bytes",
            "Bytes of overlay packets the client carried itself (TURN, DERP), by direction.",
            ["direction"],
            registry=registry,
        )
        for route in ROUTES:
            self.peers.labels(route)
        self.sent = self.proxied_bytes.labels("sent")
        self.received = self.proxied_bytes.labels("received")
