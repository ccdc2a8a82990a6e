"""Starting the exporters the config enables, and stopping them.

Each exporter receives its own plugin's section (:meth:`Plugins.settings_for`) and runs
when that section says ``enabled``: ``metrics.<name>.enabled`` for a plugin's exporter,
``metrics.enabled`` for the built-in ``prometheus`` one, whose section is ``metrics``
(``prometheus_host``, ``prometheus_port``: keys users already write).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

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
        for name, spec in plugins.exporters().items():
            settings = plugins.settings_for("exporter", name, config.converted)
            if not settings.get("enabled"):
                continue
            if name == "prometheus":  # the built-in one serves the other local routes too
                settings = {**settings, "routes": routes or {}}
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
