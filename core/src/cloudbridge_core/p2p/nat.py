"""The core's own NAT strategy plugin, ``ice`` (direct and STUN paths; the strategy itself
is in :mod:`cloudbridge_core.p2p.ice`, imported only when a mesh starts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import NatStrategy, NatStrategySpec


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
