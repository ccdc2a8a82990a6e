"""The client's Prometheus registry and its built-in ``/metrics`` endpoint."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from cloudbridge_core.log import get_logger

log = get_logger("metrics")


class ClientMetrics:
    """Metric families of the client (the seed's Part 8.1 names, in Prometheus base units)."""

    def __init__(self, transports: list[str]) -> None:
        self.registry = CollectorRegistry()
        self.transport_mode = Gauge(
            "cloudbridge_client_transport_mode",
            "1 for the transport the client uses to reach the relay, 0 for the others.",
            ["mode"],
            registry=self.registry,
        )
        self.transport_switches = Counter(
            "cloudbridge_client_transport_switches",
            "Moves from one transport to another (fallback, latency, fall-forward, reload).",
            ["from_mode", "to_mode"],
            registry=self.registry,
        )
        for name in transports:  # bounded label values: the installed transports
            self.transport_mode.labels(name).set(0)
        self._server: WSGIServer | None = None

    def transport_selected(self, name: str, previous: str | None, _reason: str) -> None:
        if previous is not None:
            self.transport_mode.labels(previous).set(0)
            self.transport_switches.labels(previous, name).inc()
        self.transport_mode.labels(name).set(1)

    def serve(self, listen: str, port: int) -> str | None:
        """Serve ``/metrics``; a port in use is reported, never fatal to the client."""
        try:
            self._server, _ = start_http_server(port, addr=listen, registry=self.registry)
        except OSError as exc:
            log.warning("metrics_not_served", listen=listen, port=port, reason=str(exc))
            return None
        host = f"[{listen}]" if ":" in listen else listen
        return f"http://{host}:{self._server.server_port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
