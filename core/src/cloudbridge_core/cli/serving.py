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
#: how many of the command's tasks wait in wait_for_stop() now (one list shared by every
#: task of the command: each copies the context, not the list)
_waiting: ContextVar[list[int]] = ContextVar("waiting_for_stop")
#: the running command's loop and stop event, for stops that come from another thread
_running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


def request_stop() -> None:
    """Ask the running command to stop cleanly, from any thread (a Windows service stop)."""
    for loop, stop in _running:
        loop.call_soon_threadsafe(stop.set)


async def wait_for_stop(duration: float | None = None) -> None:
    """Return once SIGINT/SIGTERM has come or after ``duration``.

    Only a command waiting here stops cleanly (drains); a signal that comes while it is
    anywhere else (connecting, retrying, starting up) cancels it at once."""
    waiting = _waiting.get([0])
    waiting[0] += 1
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_stop_requested.get().wait(), duration)
    finally:
        waiting[0] -= 1


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` until it returns or a signal stops it.

    SIGINT/SIGTERM while ``main`` waits in :func:`wait_for_stop` asks for a clean stop (a
    drain); at any other moment (connecting, retrying) it cancels ``main`` at once. A second
    signal ends the process without draining. After SIGINT this raises
    ``KeyboardInterrupt`` (the command exits 130); after SIGTERM it returns (exit 0)."""
    received: list[signal.Signals] = []

    async def supervised() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        waiting = [0]
        task = asyncio.current_task()

        def requested(sig: signal.Signals) -> None:
            if stop.is_set():
                loop.remove_signal_handler(sig)  # back to the default: the signal now ends us
                signal.raise_signal(sig)
            received.append(sig)
            stop.set()
            if task is not None and not waiting[0]:
                task.cancel()  # not at a point that stops cleanly: stop where it is

        # Windows event loops take no signal handlers: there Ctrl-C raises KeyboardInterrupt
        # and the service host stops the client through request_stop()
        signals = () if sys.platform == "win32" else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, requested, sig)
        _stop_requested.set(stop)
        _waiting.set(waiting)
        _running.append((loop, stop))
        try:
            await main()
        except asyncio.CancelledError:
            if not received:
                raise
        finally:
            _running.remove((loop, stop))
            for sig in signals:
                loop.remove_signal_handler(sig)

    if uvloop is not None:
        uvloop.run(supervised())
    else:
        asyncio.run(supervised())
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt
