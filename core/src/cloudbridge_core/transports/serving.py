"""What every listener does with a new session: run the core's handler, then close it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from cloudbridge_core.log import get_logger
from cloudbridge_core.providers import Session

log = get_logger("transport")


async def run_session_handler(
    handler: Callable[[Session], Awaitable[None]], session: Session
) -> None:
    """A handler's bug ends its own session, never the listener; a listener that closes
    cancels its handlers, which is no error (asyncio would log a cancelled callback)."""
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await handler(session)
    except Exception:
        log.exception("session_handler_failed")
    finally:
        await session.aclose()
