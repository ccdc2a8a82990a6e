"""Running a long-lived command until SIGINT/SIGTERM (or a deadline), then stopping cleanly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

try:  # uvloop where available: the event loop is the hot path of every byte forwarded
    import uvloop
except ImportError:  # Windows has no uvloop
    uvloop = None  # type: ignore[assignment]


async def wait_for_stop(duration: float | None = None) -> None:
    """Return on SIGINT/SIGTERM or after ``duration`` seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), duration)
    except TimeoutError:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())
