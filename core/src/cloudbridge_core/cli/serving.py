"""Running a long-lived command until SIGINT/SIGTERM (or a deadline), then stopping cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any

try:  # uvloop where available: the event loop is the hot path of every byte forwarded
    import uvloop
except ImportError:  # Windows has no uvloop
    uvloop = None  # type: ignore[assignment]


def notify(state: str) -> None:
    """Tell systemd how the service is doing (``Type=notify``); nothing outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(state.encode(), address)


_stop_requested: ContextVar[asyncio.Event] = ContextVar("stop_requested")
#: the running command's loop and stop event, for stops that come from another thread
_running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


def request_stop() -> None:
    """Ask the running command to stop cleanly, from any thread (a Windows service stop)."""
    for loop, stop in _running:
        loop.call_soon_threadsafe(stop.set)


async def wait_for_stop(duration: float | None = None) -> None:
    """Return once SIGINT/SIGTERM has come (even during start-up) or after ``duration``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_stop_requested.get().wait(), duration)


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` with SIGINT/SIGTERM asking for a clean stop from the first moment; a
    second signal stops at once, without draining."""

    async def supervised() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def requested(sig: signal.Signals) -> None:
            if stop.is_set():
                loop.remove_signal_handler(sig)  # back to the default: the signal now ends us
                signal.raise_signal(sig)
            stop.set()

        # Windows event loops take no signal handlers: there Ctrl-C raises KeyboardInterrupt
        # and the service host stops the client through request_stop()
        signals = () if sys.platform == "win32" else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, requested, sig)
        _stop_requested.set(stop)
        _running.append((loop, stop))
        try:
            await main()
        finally:
            _running.remove((loop, stop))
            for sig in signals:
                loop.remove_signal_handler(sig)

    if uvloop is not None:
        uvloop.run(supervised())
    else:
        asyncio.run(supervised())
