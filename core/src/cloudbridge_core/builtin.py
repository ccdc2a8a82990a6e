"""The core's own plugin: the built-in TLS-over-TCP transport, so the core works alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, Transport, TransportSpec

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "The built-in TLS-over-TCP transport: its relay port and its multiplexer"
    " limits (security limits).",
    "properties": {
        "port": {
            "$ref": "#/$defs/port",
            "default": 5556,
            "description": "Relay port (TCP): the relay listens on it, clients connect to it.",
        },
        "max_frame_size": {
            "type": "integer",
            "minimum": 1024,
            "maximum": 16777215,
            "default": 65536,
            "description": "Largest multiplexer frame accepted, in bytes.",
        },
        "initial_window": {
            "type": "integer",
            "minimum": 65536,
            "maximum": 1073741824,
            "default": 262144,
            "description": "Bytes a peer may send on a stream before the reader catches up.",
        },
        "max_streams": {
            "type": "integer",
            "minimum": 1,
            "maximum": 65536,
            "default": 1024,
            "description": "Concurrent streams per connection; more are refused.",
        },
    },
}


def _load_tls(settings: Mapping[str, Any]) -> Transport:
    from cloudbridge_core.protocol.mux import MuxLimits
    from cloudbridge_core.transports.tls import TlsTransport

    # every key but the relay's port is a multiplexer limit
    limits = {key: value for key, value in settings.items() if key != "port"}
    return TlsTransport(MuxLimits(**limits))


@hookimpl
def cloudbridge_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="tls",
            load=_load_tls,
            priority=40,
            description="TLS over TCP carrying the core stream multiplexer",
        )
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="transport.tls", schema=SETTINGS_SCHEMA)]
