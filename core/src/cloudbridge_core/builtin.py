"""The core's own plugin: the built-in TLS-over-TCP transport, so the core works alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import Transport, TransportSpec


def _load_tls(_settings: Mapping[str, Any]) -> Transport:
    from cloudbridge_core.transports.tls import TlsTransport

    return TlsTransport()


@hookimpl
def cloudbridge_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="tls",
            load=_load_tls,
            priority=10,
            description="TLS over TCP carrying the core stream multiplexer",
        )
    ]
