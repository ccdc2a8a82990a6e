"""The built-in ``prometheus`` exporter: ``/metrics`` for Prometheus to scrape.

It serves the process's other local routes on the same port (the client's
``/api/v1/status``, the relay's ``/healthz`` and ``/readyz``), so that one address answers
everything an operator points tools at. Loopback by default (``metrics.prometheus_host``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cloudbridge_core.httpd import Handler, LocalHttpServer
from cloudbridge_core.log import get_logger

log = get_logger("exporters.prometheus")


class PrometheusExporter:
    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._host: str = settings["prometheus_host"]
        self._port: int = settings["prometheus_port"]
        self.allowed_hosts: list[str] = list(settings.get("allowed_hosts") or ())
        self._routes: dict[str, Handler] = dict(settings.get("routes") or {})
        self._server: LocalHttpServer | None = None
        #: where ``/metrics`` answers, once started; None when the port could not be had
        self.url: str | None = None

    async def start(self, registry: CollectorRegistry) -> None:
        """Serve; a port in use is reported, never fatal (the tunnels matter more)."""
        self._server = LocalHttpServer(
            {
                "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
                **self._routes,
            },
            allowed_hosts=self.allowed_hosts,
        )
        try:
            self.url = f"{await self._server.start(self._host, self._port)}/metrics"
        except OSError as exc:
            self._server = None
            log.warning(
                "metrics_not_served",
                host=self._host,
                port=self._port,
                reason=exc.strerror or str(exc),
            )

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.aclose()
            self._server = None
