"""Waiting in tests for state that another task, thread or process changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], object], within: float = 10) -> None:
    """Poll ``condition`` until it holds, bounded: a hang guard, not a measured bound."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
