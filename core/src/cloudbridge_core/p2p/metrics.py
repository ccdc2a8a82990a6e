"""The client's peer-to-peer metrics (``cloudbridge_client_p2p_`` prefix, base units)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from cloudbridge_core.p2p.session import RANK

if TYPE_CHECKING:
    from cloudbridge_core.p2p.manager import PeerState


class P2PMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.peers = Gauge(
            "cloudbridge_client_p2p_peers",
            "Peers by the path their session takes now (none: no working path).",
            ["path"],
            registry=registry,
        )
        self.path_changes = Counter(
            "cloudbridge_client_p2p_path_changes",
            "Moves of a peer session from one path to another.",
            registry=registry,
        )
        self.attempts = Counter(
            "cloudbridge_client_p2p_attempts",
            "Attempts at a path to a peer, by strategy (hole punching for ice).",
            ["strategy"],
            registry=registry,
        )
        self.successes = Counter(
            "cloudbridge_client_p2p_successes",
            "Attempts that gave a working path, by strategy.",
            ["strategy"],
            registry=registry,
        )
        self.bytes = Counter(
            "cloudbridge_client_p2p_bytes",
            "Bytes of peer sessions on the wire, by direction.",
            ["direction"],
            registry=registry,
        )
        for path in (*RANK, "none"):
            self.peers.labels(path)
        self._seen = {"sent": 0, "received": 0}

    def observe(self, peers: Iterable[PeerState]) -> None:
        counts = dict.fromkeys((*RANK, "none"), 0)
        sent = received = 0
        for state in peers:
            counts[state.session.path or "none"] += 1
            sent += state.session.bytes_sent
            received += state.session.bytes_received
        for path, count in counts.items():
            self.peers.labels(path).set(count)
        for direction, total in (("sent", sent), ("received", received)):
            if total > self._seen[direction]:
                self.bytes.labels(direction).inc(total - self._seen[direction])
            self._seen[direction] = total
