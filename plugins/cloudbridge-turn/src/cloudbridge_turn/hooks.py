"""Hooks of the `turn` plugin (the strategy module is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import NatStrategy, NatStrategySpec


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
