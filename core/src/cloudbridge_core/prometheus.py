"""The core's own ``prometheus`` exporter plugin; the exporter is imported only when started,
so commands that serve no metrics do not pay for prometheus_client and the HTTP server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import Exporter, ExporterSpec


def _load_prometheus(settings: Mapping[str, Any]) -> Exporter:
    from cloudbridge_core.prometheus_exporter import PrometheusExporter

    return PrometheusExporter(settings)


@hookimpl
def cloudbridge_exporters() -> list[ExporterSpec]:
    return [
        ExporterSpec(
            name="prometheus",
            load=_load_prometheus,
            description="serves /metrics (metrics.prometheus_host, metrics.prometheus_port)",
        )
    ]
