"""Starting the exporters the config enables (``metrics.<name>.enabled``), and stopping them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry

from cloudbridge_core.config import Config
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins

log = get_logger("exporters")


@contextlib.asynccontextmanager
async def exporting(
    config: Config, plugins: Plugins, registry: CollectorRegistry
) -> AsyncIterator[list[str]]:
    """Run every enabled exporter for the block; on exit each flushes and stops."""
    running = []
    try:
        for name, spec in plugins.providers("exporter").items():
            settings = config.data["metrics"].get(name) or {}
            if not settings.get("enabled"):
                continue
            exporter = spec.load(settings)
            await exporter.start(registry)
            running.append((name, exporter))
            log.info("exporter_started", exporter=name)
        yield [name for name, _ in running]
    finally:
        for name, exporter in reversed(running):
            try:
                await exporter.stop()
            except Exception:  # one exporter's failure must not keep the others from flushing
                log.exception("exporter_stop_failed", exporter=name)
