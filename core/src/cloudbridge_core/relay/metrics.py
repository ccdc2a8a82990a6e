"""The relay's Prometheus metrics (base units, ``cloudbridge_relay_`` prefix)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloudbridge_core.config.reload_metrics import ReloadCollector
from cloudbridge_core.transports.preauth import PER_ADDRESS, TOTAL

if TYPE_CHECKING:
    from cloudbridge_core.config.reload import ConfigWatcher
    from cloudbridge_core.relay.server import Relay


class SessionCollector(Collector):
    """Sessions open now, by transport (and by tenant when asked: tenants are bounded by
    the relay's own users, but a large relay may not want one series each).

    ``tenant_labels`` may be switched while the relay serves; the next scrape follows it."""

    def __init__(self, relay: Relay, tenant_labels: bool) -> None:
        self._relay = relay
        self.tenant_labels = tenant_labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_transport = GaugeMetricFamily(
            "cloudbridge_relay_sessions", "Sessions open now, by transport.", labels=["transport"]
        )
        for transport, count in sorted(self._relay.sessions_by_transport.items()):
            by_transport.add_metric([transport], count)
        yield by_transport
        yield GaugeMetricFamily(
            "cloudbridge_relay_streams_active",
            "Tunnelled streams open now.",
            value=self._relay.streams_active,
        )
        peers = self._relay.mesh.peers_by_tenant()
        yield GaugeMetricFamily(
            "cloudbridge_relay_mesh_peers", "Peers in a mesh now.", value=sum(peers.values())
        )
        if self.tenant_labels:
            mesh = GaugeMetricFamily(
                "cloudbridge_relay_tenant_mesh_peers",
                "Peers in the mesh now, by tenant.",
                labels=["tenant_id"],
            )
            for tenant, count in sorted(peers.items()):
                mesh.add_metric([tenant], count)
            yield mesh
            by_tenant = GaugeMetricFamily(
                "cloudbridge_relay_tenant_sessions",
                "Sessions open now, by tenant.",
                labels=["tenant_id"],
            )
            for tenant, count in sorted(self._relay.sessions_by_tenant.items()):
                by_tenant.add_metric([tenant], count)
            yield by_tenant


class PreauthCollector(Collector):
    """The pre-auth budget: connections waiting to authenticate, and those refused."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gate = self._relay.preauth
        yield GaugeMetricFamily(
            "cloudbridge_relay_preauth_pending",
            "Connections accepted and not yet authenticated.",
            value=gate.pending,
        )
        refused = CounterMetricFamily(
            "cloudbridge_relay_preauth_refused",
            "Connections closed at accept for being over a pre-auth cap (per_address, total).",
            labels=["reason"],
        )
        for reason in (PER_ADDRESS, TOTAL):
            refused.add_metric([reason], gate.refused[reason])
        yield refused
        yield CounterMetricFamily(
            "cloudbridge_relay_preauth_expired",
            "Connections dropped for not authenticating within server.preauth_timeout.",
            value=gate.expired,
        )


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.sessions_opened = Counter(
            "cloudbridge_relay_sessions_opened",
            "Sessions authenticated, by transport.",
            ["transport"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "cloudbridge_relay_auth_failures",
            "Sessions refused at authentication, by error code.",
            ["code"],
            registry=registry,
        )
        self.streams = Counter(
            "cloudbridge_relay_streams", "Tunnelled streams opened.", registry=registry
        )
        self.tunnels_rejected = Counter(
            "cloudbridge_relay_tunnels_rejected",
            "Tunnel requests refused, by error code (egress_denied, unreachable, ...).",
            ["code"],
            registry=registry,
        )
        self.bytes = Counter(
            "cloudbridge_relay_bytes",
            "Bytes carried between clients and targets (to_target, from_target).",
            ["direction"],
            registry=registry,
        )
        # made once: a labels() lookup per tunnel takes a lock and a dict lookup
        self.bytes_to_target = self.bytes.labels("to_target")
        self.bytes_from_target = self.bytes.labels("from_target")
        self.sessions_reaped = Counter(
            "cloudbridge_relay_sessions_reaped",
            "Sessions closed because they stopped heartbeating.",
            registry=registry,
        )
        self.sessions_expired = Counter(
            "cloudbridge_relay_sessions_expired",
            "Sessions ended because their token expired without a refresh.",
            registry=registry,
        )
        self.sessions_deferred = Counter(
            "cloudbridge_relay_sessions_deferred",
            "Hellos told to come back later: over server.admission's rate (each given a slot).",
            registry=registry,
        )
        self.sessions_queued = Counter(
            "cloudbridge_relay_sessions_queued",
            "Hellos held until their turn (queued) over server.admission's rate.",
            registry=registry,
        )
        self.sessions_replaced = Counter(
            "cloudbridge_relay_sessions_replaced",
            "Sessions closed because their client reconnected and named them (hello.replaces).",
            registry=registry,
        )

        self.p2p_rejected = Counter(
            "cloudbridge_relay_p2p_rejected",
            "Mesh requests refused (unauthorized, bad_proof, key_in_use, not_joined, unknown_peer:"
            " never across tenants; token_expired: after the session's token expired).",
            ["reason"],
            registry=registry,
        )
        self.turn_credentials = Counter(
            "cloudbridge_relay_turn_credentials_issued",
            "TURN credentials sent to mesh members (server.turn): at each mesh_join, then"
            " renewed at half their lifetime.",
            registry=registry,
        )
        self.stun_requests = Counter(
            "cloudbridge_relay_stun_requests",
            "STUN binding requests answered (server.stun_port).",
            registry=registry,
        )
        self.derp_bytes = Counter(
            "cloudbridge_relay_derp_bytes",
            "Sealed peer packets forwarded over DERP channels (payload bytes).",
            registry=registry,
        )
        self.rate_limited = Counter(
            "cloudbridge_relay_rate_limited",
            "Sessions over a request rate (server.rate_limits), by kind (control_messages,"
            " mux_pings, stream_opens) and action (slowed, disconnected).",
            ["kind", "action"],
            registry=registry,
        )

    def watch(self, relay: Relay, *, tenant_labels: bool) -> None:
        """Collect ``relay``'s sessions, streams and peers at each scrape."""
        self._sessions = SessionCollector(relay, tenant_labels)
        self.registry.register(self._sessions)
        self.registry.register(PreauthCollector(relay))

    def watch_reloads(self, watcher: ConfigWatcher) -> None:
        """Count ``watcher``'s reloads as ``cloudbridge_relay_config_reloads_total``."""
        self.registry.register(ReloadCollector("cloudbridge_relay", watcher))

    def label_tenants(self, enabled: bool) -> None:
        """Switch the by-tenant series of :meth:`watch` on or off (``metrics.tenant_labels``)."""
        self._sessions.tenant_labels = enabled
