"""Hooks of the `grpc` plugin (nothing heavy: grpcio is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import ConfigSection, Transport, TransportSpec, hookimpl

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {
            "$ref": "#/$defs/port",
            "default": 5554,
            "description": "Relay port (TCP): the relay listens on it, clients connect to it.",
        },
        "max_message_bytes": {
            "type": "integer",
            "minimum": 65536,
            "maximum": 67108864,
            "default": 4194304,
            "description": "Largest gRPC message sent or accepted (a security limit).",
        },
        "keepalive_interval": {
            "$ref": "#/$defs/duration",
            "default": "20s",
            "description": (
                "HTTP/2 keepalive pings (keep NAT bindings open, find dead paths). At least 1s:"
                " the relay accepts a client's pings down to every 500ms and ends a connection"
                " pinging faster (GOAWAY too_many_pings; a security limit)."
            ),
            "minDuration": "1s",
        },
        "keepalive_timeout": {
            "$ref": "#/$defs/duration",
            "default": "20s",
            "description": "A keepalive ping unanswered this long ends the connection.",
        },
    },
}


def _load(settings: Mapping[str, Any]) -> Transport:
    from cloudbridge_grpc.transport import GrpcTransport

    return GrpcTransport(settings)


@hookimpl
def cloudbridge_transports() -> list[TransportSpec]:
    return [
        TransportSpec(name="grpc", load=_load, priority=20, description="gRPC over TLS (HTTP/2)")
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="transport.grpc", schema=SETTINGS_SCHEMA)]
