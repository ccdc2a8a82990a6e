"""Starting the exporters the config enables, and stopping them.

Each exporter receives its own plugin's section (:meth:`Plugins.settings_for`) and runs
when that section says ``enabled``: ``metrics.<name>.enabled`` for a plugin's exporter,
``metrics.enabled`` for the built-in ``prometheus`` one, whose section is ``metrics``
(``prometheus_host``, ``prometheus_port``: keys users already write).

The client serves ``/metrics`` on the schema's default port (9464), the relay on
:data:`RELAY_METRICS_PORT` (9465) unless ``metrics.prometheus_port`` is set, so that both
run on one host. A default port that is taken is traded for a free one (logged, and shown
by ``status`` as ``metrics_url``); a port set explicitly that is taken is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from cloudbridge_core.config import Config
from cloudbridge_core.httpd import Handler
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins
from cloudbridge_core.providers import Exporter

log = get_logger("exporters")

#: the relay's /metrics port when ``metrics.prometheus_port`` is not set (the client keeps
#: the schema's 9464): a relay and a client on one host do not take each other's port
RELAY_METRICS_PORT = 9465


def metrics_port(config: Config, *, default: int | None = None) -> tuple[int, bool]:
    """The port ``/metrics`` is served on, and whether the user set it (config file,
    environment or flag); ``default`` replaces the schema's default when it was not set."""
    explicit = config.origin(("metrics", "prometheus_port")).source != "default"
    port = config.settings.metrics.prometheus_port
    return (port if explicit or default is None else default), explicit


@contextlib.asynccontextmanager
async def exporting(
    config: Config,
    plugins: Plugins,
    registry: CollectorRegistry,
    routes: Mapping[str, Handler] | None = None,
    *,
    default_port: int | None = None,
) -> AsyncIterator[Exporters]:
    """Run every enabled exporter for the block; on exit each flushes and stops.

    ``routes`` are the process's other local HTTP routes, served next to ``/metrics``;
    ``default_port`` is this process's ``/metrics`` port when the config sets none (the
    relay's :data:`RELAY_METRICS_PORT`). Raises ``AddressInUse`` when a port the config
    sets is taken.
    """
    exporters = Exporters(plugins, registry, routes or {}, default_port=default_port)
    try:
        await exporters.apply(config)
        yield exporters
    finally:
        await exporters.aclose()


class Exporters:
    """The running exporters. :meth:`apply` takes a (reloaded) config: an exporter whose
    settings changed is stopped and started again with the new ones (``/metrics`` moves to
    a new address), one newly enabled starts, one disabled stops; the others run on."""

    def __init__(
        self,
        plugins: Plugins,
        registry: CollectorRegistry,
        routes: Mapping[str, Handler],
        *,
        default_port: int | None = None,
    ) -> None:
        self._default_port = default_port
        self._plugins = plugins
        self._registry = registry
        self._routes = routes
        self.running: dict[str, Exporter] = {}
        self._settings: dict[str, Mapping[str, Any]] = {}

    def get(self, name: str) -> Exporter | None:
        return self.running.get(name)

    async def apply(self, config: Config) -> list[str]:
        """Start, restart or stop exporters as ``config`` says; returns the ones touched."""
        touched = []
        for name, spec in self._plugins.exporters().items():
            settings = self._plugins.settings_for("exporter", name, config.converted)
            if name == "prometheus":  # the built-in one serves the other local routes too
                port, explicit = metrics_port(config, default=self._default_port)
                settings = {
                    **settings,
                    "routes": self._routes,
                    "prometheus_port": port,
                    "port_explicit": explicit,
                }
            if settings == self._settings.get(name):
                continue
            self._settings[name] = settings
            touched.append(name)
            await self._stop(name)
            if not settings.get("enabled"):
                continue
            exporter = spec.load(settings)
            await exporter.start(self._registry)
            self.running[name] = exporter
            log.info("exporter_started", exporter=name)
        return touched

    async def aclose(self) -> None:
        for name in reversed(list(self.running)):
            await self._stop(name)

    async def _stop(self, name: str) -> None:
        exporter = self.running.pop(name, None)
        if exporter is None:
            return
        try:
            await exporter.stop()
        except Exception:  # one exporter's failure must not keep the others from flushing
            log.exception("exporter_stop_failed", exporter=name)
