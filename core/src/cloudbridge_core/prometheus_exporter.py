"""The built-in ``prometheus`` exporter: ``/metrics`` for Prometheus to scrape.

It serves the process's other local routes on the same port (the client's
``/api/v1/status``, the relay's ``/healthz`` and ``/readyz``), so that one address answers
everything an operator points tools at. Loopback by default (``metrics.prometheus_host``).
A default port that is taken is traded for a free one, said once in the log; a port the
user set (``port_explicit``) that is taken stops the command with ``AddressInUse``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cloudbridge_core.errors import AddressInUse
from cloudbridge_core.httpd import Handler, LocalHttpServer
from cloudbridge_core.log import get_logger

log = get_logger("exporters.prometheus")


class PrometheusExporter:
    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._host: str = settings["prometheus_host"]
        self._port: int = settings["prometheus_port"]
        #: the user set the port: a taken one is an error, not a reason to pick another
        self._explicit: bool = bool(settings.get("port_explicit", True))
        self.allowed_hosts: list[str] = list(settings.get("allowed_hosts") or ())
        self._routes: dict[str, Handler] = dict(settings.get("routes") or {})
        self._server: LocalHttpServer | None = None
        #: where ``/metrics`` answers, once started; None when the port could not be had
        self.url: str | None = None

    async def start(self, registry: CollectorRegistry) -> None:
        """Serve. A default port in use is traded for a free one (logged once); a port the
        user set in use raises ``AddressInUse`` naming the key; any other failure to listen
        is reported, never fatal (the tunnels matter more)."""
        self._server = LocalHttpServer(
            {
                "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
                **self._routes,
            },
            allowed_hosts=self.allowed_hosts,
        )
        try:
            try:
                base = await self._server.start(self._host, self._port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if self._explicit:
                    raise AddressInUse(
                        f"metrics.prometheus_port {self._port} on {self._host} is in use"
                        " by another process",
                        hint="set metrics.prometheus_port to a free port, or remove it to"
                        " let cloudbridge pick one",
                    ) from None
                base = await self._server.start(self._host, 0)
                log.warning(
                    "metrics_port_busy",
                    port=self._port,
                    using=f"{base}/metrics",
                    hint="set metrics.prometheus_port to choose the port",
                )
            self.url = f"{base}/metrics"
        except OSError as exc:
            self._server = None
            log.warning(
                "metrics_not_served",
                host=self._host,
                port=self._port,
                reason=exc.strerror or str(exc),
            )
        except AddressInUse:
            self._server = None
            raise

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.aclose()
            self._server = None
