"""pyroute2's netlink sockets on a thread of their own.

pyroute2 runs its sockets on asyncio datagram endpoints of family AF_NETLINK, which
uvloop (the client's event loop) cannot create ("invalid family 16"). So each socket
here is a synchronous one, made and used on one worker thread with a standard selector
loop of its own; the client's loop only awaits the calls. The thread is in the process's
network namespace, like the loop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class NetlinkThread:
    """One pyroute2 socket (``factory(use_event_loop=loop)``) on its own thread."""

    def __init__(self, factory: Callable[..., Any]) -> None:
        self._factory = factory
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: Any = None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``socket.method(*args, **kwargs)`` on the thread; its exceptions come through."""
        work = functools.partial(self._run, method, args, kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._socket is None:
            self._loop = asyncio.SelectorEventLoop()
            self._socket = self._factory(use_event_loop=self._loop)
        return getattr(self._socket, method)(*args, **kwargs)

    def close(self) -> None:
        """Close the socket and its loop on their thread, then end the thread."""
        self._executor.submit(self._close).result()
        self._executor.shutdown()

    def _close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(Exception):  # the kernel dropped it already
                self._socket.close()
        if self._loop is not None:
            self._loop.close()
