"""Hooks of the `quic` plugin (nothing heavy: aioquic is imported by `_load`)."""

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
            "default": 5553,
            "description": "Relay port (UDP): the relay listens on it, clients connect to it.",
        },
        "idle_timeout": {
            "$ref": "#/$defs/duration",
            "default": "30s",
            "description": "A connection that hears nothing for this long is closed.",
        },
        "keepalive_interval": {
            "$ref": "#/$defs/duration",
            "default": "10s",
            "description": "How often the client PINGs (keeps NAT bindings open).",
        },
        "max_datagram_size": {
            "type": "integer",
            "minimum": 1200,
            "maximum": 16384,
            "default": 16384,
            "description": "Ceiling on the datagram size taken from the path MTU.",
        },
        "stream_window": {
            "type": "integer",
            "minimum": 65536,
            "maximum": 67108864,
            "default": 1048576,
            "description": "Bytes a peer may send on a stream before the reader catches up.",
        },
        "connection_window": {
            "type": "integer",
            "minimum": 65536,
            "maximum": 1073741824,
            "default": 16777216,
            "description": (
                "Bytes a peer may send on all streams beyond what has arrived"
                " (what is left unread is bounded per stream by stream_window)."
            ),
        },
        "max_streams": {
            "type": "integer",
            "minimum": 1,
            "maximum": 65536,
            "default": 1024,
            "description": "Concurrent streams a peer may open.",
        },
        "max_datagram_frame_bytes": {
            "type": "integer",
            "minimum": 1200,
            "maximum": 16384,
            "default": 2048,
            "description": "Largest QUIC DATAGRAM frame accepted (packets of later features).",
        },
        "retry": {
            "type": "boolean",
            "default": True,
            "description": "Validate every new client's address with a stateless Retry before "
            "holding any state for it (one more round trip per connection), so spoofed "
            "Initials cost the relay nothing. This is a security limit.",
            "x-restart-required": True,
        },
    },
}


def _load(settings: Mapping[str, Any]) -> Transport:
    from cloudbridge_quic.transport import QuicTransport

    return QuicTransport(settings)


@hookimpl
def cloudbridge_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="quic",
            load=_load,
            priority=10,
            description="native QUIC streams over UDP (aioquic)",
        )
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="transport.quic", schema=SETTINGS_SCHEMA)]
