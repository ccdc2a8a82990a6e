"""Hooks of the `derp` plugin (the strategy module is imported by `_load`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import NatStrategy, NatStrategySpec, hookimpl


def _load(settings: Mapping[str, Any]) -> NatStrategy:
    from cloudbridge_derp.strategy import DerpStrategy

    return DerpStrategy()


@hookimpl
def cloudbridge_nat_strategies() -> list[NatStrategySpec]:
    return [
        NatStrategySpec(
            name="derp",
            load=_load,
            priority=10,
            description="packets sealed end to end, forwarded by the relay over its sessions",
        )
    ]
