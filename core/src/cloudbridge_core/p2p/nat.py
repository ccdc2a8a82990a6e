"""The core's own NAT strategy plugin, ``ice`` (direct and STUN paths; the strategy itself
is in :mod:`cloudbridge_core.p2p.ice`, imported only when a mesh starts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, NatStrategy, NatStrategySpec

#: The part of ``p2p.ice`` this strategy reads. The core's schema describes and checks the
#: section (its keys predate plugins); declaring it routes ``p2p.ice`` to this ``load``.
SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "stun_servers": {
            "type": "array",
            "items": {"type": "string"},
            "description": "STUN servers, as stun:host:port.",
        },
    },
}


def _load(settings: Mapping[str, Any]) -> NatStrategy:
    from cloudbridge_core.p2p.ice import IceStrategy

    return IceStrategy(settings)


@hookimpl
def cloudbridge_nat_strategies() -> list[NatStrategySpec]:
    return [
        NatStrategySpec(
            name="ice",
            load=_load,
            priority=30,
            description="ICE with host and STUN candidates (p2p.ice.stun_servers): direct paths",
        )
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="p2p.ice", schema=SETTINGS_SCHEMA)]
