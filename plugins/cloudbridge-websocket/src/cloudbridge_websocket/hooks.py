"""Hooks of the `websocket` plugin (nothing heavy: `websockets` is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, Transport, TransportSpec

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
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
    # below the built-in TLS transport's 10: the WebSocket framing costs a little, so it is
    # chosen first only when asked for (or when plain TLS cannot get through)
    return [TransportSpec(name="websocket", load=_load, priority=5, description="TLS WebSocket")]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="transport.websocket", schema=SETTINGS_SCHEMA)]
