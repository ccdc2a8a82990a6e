"""Hooks of the `wireguard` plugin (nothing heavy: pyroute2 is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import ConfigSection, Overlay, OverlaySpec, hookimpl

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "backend": {
            "enum": ["auto", "kernel", "wireguard-go"],
            "default": "auto",
            "description": (
                "How WireGuard runs: auto uses the kernel's where it has one, else "
                "wireguard-go (Debian package wireguard-go); kernel or wireguard-go insist."
            ),
            "x-restart-required": True,
        },
        "listen_port": {
            "type": "integer",
            "minimum": 0,
            "maximum": 65535,
            "default": 0,
            "description": (
                "The UDP port WireGuard listens on (0: any free port). Peers on direct and "
                "STUN paths reach it through the punched port, not this one."
            ),
            "x-restart-required": True,
        },
    },
}


def _load(settings: Mapping[str, Any]) -> Overlay:
    from cloudbridge_wireguard.overlay import WireGuardOverlay

    return WireGuardOverlay(settings)


@hookimpl
def cloudbridge_overlays() -> list[OverlaySpec]:
    return [
        OverlaySpec(
            name="wireguard",
            load=_load,
            description="WireGuard: the kernel's, or wireguard-go",
        )
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="overlay.wireguard", schema=SETTINGS_SCHEMA)]
