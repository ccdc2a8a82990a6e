"""The cluster backend's Prometheus metrics (``cloudbridge_relay_cluster_`` prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: a healthy Redis answers on a LAN in about a millisecond; the socket timeout is 1 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ClusterMetrics:
    """What an operator watches of the shared backend: is it up, how fast it answers, how
    often it fails, and how many relays it sees."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "cloudbridge_relay_cluster_backend_up",
            "1 while the cluster's backend answers, 0 during an outage.",
            registry=registry,
        )
        self.latency = Histogram(
            "cloudbridge_relay_cluster_backend_latency_seconds",
            "Time the cluster's backend took to answer, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "cloudbridge_relay_cluster_backend_errors",
            "Operations on the cluster's backend that failed (unreachable, timed out).",
            registry=registry,
        )
        self.relays = Gauge(
            "cloudbridge_relay_cluster_relays",
            "Live relays of the cluster, this one included.",
            registry=registry,
        )
