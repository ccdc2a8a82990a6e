"""Hooks of the `turn` plugin (the strategy module is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import ConfigSection, NatStrategy, NatStrategySpec, hookimpl

#: The part of ``p2p.ice`` this strategy reads. The core's schema describes and checks each
#: server (the key predates plugins); declaring the section routes ``p2p.ice`` to ``_load``.
SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "turn_servers": {
            "type": "array",
            "items": {"type": "object"},
            "default": [],
            "description": "TURN servers with long-term credentials.",
        },
    },
}


def _load(settings: Mapping[str, Any]) -> NatStrategy:
    from cloudbridge_turn.strategy import TurnStrategy

    return TurnStrategy(settings)


@hookimpl
def cloudbridge_nat_strategies() -> list[NatStrategySpec]:
    return [
        NatStrategySpec(
            name="turn",
            load=_load,
            priority=20,
            description="ICE over TURN relay candidates (p2p.ice.turn_servers)",
        )
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="p2p.ice", schema=SETTINGS_SCHEMA)]
