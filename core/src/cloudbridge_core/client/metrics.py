"""The client's Prometheus metrics (base units, ``cloudbridge_client_`` prefix).

docs/metrics.md maps the seed's names (Part 8.1) to these. Tunnel byte and connection
counts are read from the tunnels' own statistics at scrape time, so the data path pays
nothing for them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cloudbridge_core.config.reload_metrics import ReloadCollector

if TYPE_CHECKING:
    from cloudbridge_core.client.tunnel import Tunnel
    from cloudbridge_core.config.reload import ConfigWatcher

#: seconds; heartbeats and tunnel setups on LANs, WANs and satellite links
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class TunnelCollector(Collector):
    """Bytes and connections of the running tunnels, read when scraped."""

    def __init__(self, tunnels: Callable[[], Iterable[Tunnel]]) -> None:
        self._tunnels = tunnels

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        tunnels = list(self._tunnels())
        moved = CounterMetricFamily(
            "cloudbridge_client_bytes",
            "Bytes carried through tunnels, by direction (sent: local -> remote).",
            labels=["direction"],
        )
        moved.add_metric(["sent"], sum(t.statistics.bytes_sent for t in tunnels))
        moved.add_metric(["received"], sum(t.statistics.bytes_received for t in tunnels))
        yield moved
        yield GaugeMetricFamily(
            "cloudbridge_client_connections_active",
            "Tunnelled TCP connections open now.",
            value=sum(t.statistics.active_connections for t in tunnels),
        )
        yield CounterMetricFamily(
            "cloudbridge_client_connections",
            "Tunnelled TCP connections accepted.",
            value=sum(t.statistics.total_connections for t in tunnels),
        )
        yield GaugeMetricFamily(
            "cloudbridge_client_tunnels_active",
            "Tunnels listening now.",
            value=sum(1 for t in tunnels if t.listening),
        )


class TenantLabelled(Collector):
    """Every sample of ``source``, with a ``tenant_id`` label while ``labelled`` is set
    (``metrics.tenant_labels``, which a reload may change).

    A client speaks for one tenant, so the label adds one value, never an unbounded set.
    """

    def __init__(
        self, source: CollectorRegistry, tenant: Callable[[], str | None], labelled: bool = True
    ) -> None:
        self._source = source
        self._tenant = tenant
        self.labelled = labelled

    def collect(self) -> Iterator[Metric]:
        if not self.labelled:
            yield from self._source.collect()
            return
        tenant = self._tenant() or ""
        for family in self._source.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name,
                    {**sample.labels, "tenant_id": tenant},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield labelled


def with_tenant_label(
    source: CollectorRegistry, tenant: Callable[[], str | None], labelled: bool = True
) -> tuple[CollectorRegistry, TenantLabelled]:
    """A registry exposing ``source``, and the switch putting the tenant's label on every
    sample of it."""
    exposed = CollectorRegistry()
    switch = TenantLabelled(source, tenant, labelled)
    exposed.register(switch)
    return exposed, switch


class ClientMetrics:
    def __init__(self, transports: list[str]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.transport_mode = Gauge(
            "cloudbridge_client_transport_mode",
            "1 for the transport the client uses to reach the relay, 0 for the others.",
            ["mode"],
            registry=registry,
        )
        self.transport_switches = Counter(
            "cloudbridge_client_transport_switches",
            "Moves from one transport to another (fallback, latency, fall-forward, reload).",
            ["from_mode", "to_mode"],
            registry=registry,
        )
        self.heartbeat_latency = Histogram(
            "cloudbridge_client_heartbeat_latency_seconds",
            "Round-trip time of heartbeats to the relay.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.heartbeat_failures = Counter(
            "cloudbridge_client_heartbeat_failures",
            "Heartbeats the relay did not answer in time.",
            registry=registry,
        )
        self.heartbeat_loss = Gauge(
            "cloudbridge_client_heartbeat_loss_ratio",
            "Share of the last health check's heartbeats that went unanswered (0-1).",
            registry=registry,
        )
        self.heartbeat_jitter = Gauge(
            "cloudbridge_client_heartbeat_jitter_seconds",
            "Mean difference between consecutive heartbeat round trips in the last check.",
            registry=registry,
        )
        self.connection_failures = Counter(
            "cloudbridge_client_connection_failures",
            "Attempts to connect to the relay that failed, by transport.",
            ["transport"],
            registry=registry,
        )
        self.reconnection_attempts = Counter(
            "cloudbridge_client_reconnection_attempts",
            "Rounds of reconnection after the session to the relay was lost.",
            registry=registry,
        )
        self.errors = Counter(
            "cloudbridge_client_errors",
            "Classified errors, by error type (the codes of docs/errors.md).",
            ["error_type"],
            registry=registry,
        )
        self.tunnel_listen_failures = Counter(
            "cloudbridge_client_tunnel_listen_failures",
            "Tunnels of a reloaded config that could not listen (address in use or not local).",
            registry=registry,
        )
        self.setup_latency = Histogram(
            "cloudbridge_client_tunnel_setup_seconds",
            "Time from accepting a local connection to the relay connecting its target.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for name in transports:  # bounded label values: the installed transports
            self.transport_mode.labels(name).set(0)

    def transport_selected(self, name: str, previous: str | None, _reason: str) -> None:
        if previous is not None:
            self.transport_mode.labels(previous).set(0)
            self.transport_switches.labels(previous, name).inc()
        self.transport_mode.labels(name).set(1)

    def heartbeats(self, rtts: list[float], failures: int) -> None:
        for rtt in rtts:
            self.heartbeat_latency.observe(rtt)
        self.heartbeat_failures.inc(failures)
        total = len(rtts) + failures
        self.heartbeat_loss.set(failures / total if total else 0.0)
        steps = [abs(b - a) for a, b in itertools.pairwise(rtts)]
        self.heartbeat_jitter.set(sum(steps) / len(steps) if steps else 0.0)

    def watch_tunnels(self, tunnels: Callable[[], Iterable[Tunnel]]) -> None:
        self.registry.register(TunnelCollector(tunnels))

    def watch_reloads(self, watcher: ConfigWatcher) -> None:
        """Count ``watcher``'s reloads as ``cloudbridge_client_config_reloads_total``."""
        self.registry.register(ReloadCollector("cloudbridge_client", watcher))
