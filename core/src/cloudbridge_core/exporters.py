"""Starting the exporters the config enables, and stopping them.

A plugin's exporter is enabled by ``metrics.<name>.enabled``; the built-in ``prometheus``
one by ``metrics.enabled``, with its address in ``metrics.prometheus_host`` and
``metrics.prometheus_port`` (keys users already write).
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


@contextlib.asynccontextmanager
async def exporting(
    config: Config,
    plugins: Plugins,
    registry: CollectorRegistry,
    routes: Mapping[str, Handler] | None = None,
) -> AsyncIterator[dict[str, Exporter]]:
    """Run every enabled exporter for the block; on exit each flushes and stops.

    ``routes`` are the process's other local HTTP routes, served next to ``/metrics``.
    """
    running: dict[str, Exporter] = {}
    try:
        for name, spec in plugins.providers("exporter").items():
            settings = _settings(config.data["metrics"], name, routes or {})
            if not settings.get("enabled"):
                continue
            exporter = spec.load(settings)
            await exporter.start(registry)
            running[name] = exporter
            log.info("exporter_started", exporter=name)
        yield running
    finally:
        for name, exporter in reversed(running.items()):
            try:
                await exporter.stop()
            except Exception:  # one exporter's failure must not keep the others from flushing
                log.exception("exporter_stop_failed", exporter=name)


def _settings(
    metrics: Mapping[str, Any], name: str, routes: Mapping[str, Handler]
) -> Mapping[str, Any]:
    if name == "prometheus":
        return {
            "enabled": metrics["enabled"],
            "host": metrics["prometheus_host"],
            "port": metrics["prometheus_port"],
            "routes": routes,
        }
    return metrics.get(name) or {}
