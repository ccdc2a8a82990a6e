"""Hooks of the `websocket` plugin (nothing heavy: `websockets` is imported by `_load`)."""

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
            "default": 5555,
            "description": "Relay port (TCP): the relay listens on it, clients connect to it.",
        },
        "path": {"type": "string", "pattern": "^/[A-Za-z0-9/_.-]*$", "default": "/cloudbridge"},
        "ping_interval": {"$ref": "#/$defs/duration", "default": "20s"},
        "ping_timeout": {"$ref": "#/$defs/duration", "default": "20s"},
        "max_message_bytes": {
            "type": "integer",
            "minimum": 65536,
            "maximum": 16777216,
            "default": 1048576,
            "description": "Largest WebSocket message accepted (a security limit).",
        },
    },
}


def _load(settings: Mapping[str, Any]) -> Transport:
    from cloudbridge_websocket.transport import WebSocketTransport

    return WebSocketTransport(settings)


@hookimpl
def cloudbridge_transports() -> list[TransportSpec]:
    # the seed's order is QUIC, gRPC, WebSocket, then the built-in TLS (10): a WebSocket on
    # an HTTPS-style port gets through proxies and firewalls that stop other traffic
    return [TransportSpec(name="websocket", load=_load, priority=30, description="TLS WebSocket")]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="transport.websocket", schema=SETTINGS_SCHEMA)]
