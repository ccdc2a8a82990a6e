"""Hooks of the `pushgateway` plugin (the exporter module is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import ConfigSection, Exporter, ExporterSpec, hookimpl

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean", "default": False, "description": "Push metrics."},
        "push_url": {
            "type": "string",
            "pattern": "^https?://",
            "default": "http://localhost:9091",
            "description": "The Pushgateway's base URL.",
        },
        "push_interval": {
            "$ref": "#/$defs/duration",
            "default": "15s",
            "description": "How often to push (and once more at shutdown).",
        },
        "job": {"type": "string", "minLength": 1, "default": "cloudbridge"},
        "instance": {
            "type": ["string", "null"],
            "default": None,
            "description": "The grouping key's instance (default: the host name).",
        },
        "delete_on_exit": {
            "type": "boolean",
            "default": False,
            "description": "Delete this instance's group from the gateway at shutdown.",
        },
        "username": {"type": ["string", "null"], "default": None},
        "password": {
            "type": ["string", "null"],
            "default": None,
            "writeOnly": True,
            "description": "Basic auth password (use ${VAR}; never logged).",
        },
        "ca_file": {
            "type": ["string", "null"],
            "default": None,
            "description": "PEM CA to trust for an https push_url instead of the system store.",
            "x-cloudbridge-path": "file",
        },
        "timeout": {"$ref": "#/$defs/duration", "default": "10s"},
    },
}


def _load(settings: Mapping[str, Any]) -> Exporter:
    from cloudbridge_pushgateway.exporter import PushgatewayExporter

    return PushgatewayExporter(settings)


@hookimpl
def cloudbridge_exporters() -> list[ExporterSpec]:
    return [ExporterSpec(name="pushgateway", load=_load, description="Prometheus Pushgateway")]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="metrics.pushgateway", schema=SETTINGS_SCHEMA)]
