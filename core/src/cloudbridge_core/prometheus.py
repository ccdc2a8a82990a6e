"""The core's own ``prometheus`` exporter plugin; the exporter is imported only when started,
so commands that serve no metrics do not pay for prometheus_client and the HTTP server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, Exporter, ExporterSpec

#: The keys of ``metrics`` this exporter reads. The core's schema describes and checks them
#: (users wrote them before plugins); declaring the section routes ``metrics`` to ``load``.
SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "enabled": {"type": "boolean", "description": "Serve /metrics."},
        "prometheus_host": {"type": "string", "description": "Address /metrics is served on."},
        "prometheus_port": {"type": "integer", "description": "Port /metrics is served on."},
    },
}


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


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="metrics", schema=SETTINGS_SCHEMA)]
