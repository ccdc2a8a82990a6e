"""Accepting TCP connections on a listening socket for as long as it is open.

A failed accept is not the end of a listener: when the process is out of descriptors
(``EMFILE``), or a connection is reset while still in the backlog, the loop says so and
tries again after a pause, so a tunnel or a relay listener that hit its descriptor limit
serves again once connections close, instead of silently never accepting again.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from cloudbridge_core.log import get_logger

log = get_logger("accept")

#: the pause after a failed accept: the kernel keeps the backlog meanwhile
RETRY_AFTER = 0.1


#: connections accepted in one wake-up at most: a flood of them leaves the loop its turns
BATCH = 64


async def accept_forever(
    listener: socket.socket, accepted: Callable[[socket.socket, object], None]
) -> None:
    """Call ``accepted(connection, address)`` for each connection, until cancelled.

    On a loop with readiness callbacks the listener stays registered, and each wake-up
    accepts the connections waiting in the callback itself: no future, task step or
    registration per connection (uvloop's ``sock_accept`` registers the listener, and
    sets it non-blocking again, for every connection). Windows' proactor accepts with
    ``sock_accept``.
    """
    loop = asyncio.get_running_loop()
    fd = listener.fileno()
    retry: asyncio.TimerHandle | None = None

    def ready() -> None:
        nonlocal retry
        for _ in range(BATCH):
            try:
                connection, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept_failed", reason=exc.strerror or str(exc))
                loop.remove_reader(fd)
                retry = loop.call_later(RETRY_AFTER, loop.add_reader, fd, ready)
                return
            accepted(connection, address)

    try:
        loop.add_reader(fd, ready)
    except NotImplementedError:
        await _accept_each(listener, accepted)
        return
    try:
        await loop.create_future()  # until cancelled
    finally:
        if retry is not None:
            retry.cancel()
        loop.remove_reader(fd)


async def _accept_each(
    listener: socket.socket, accepted: Callable[[socket.socket, object], None]
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            connection, address = await loop.sock_accept(listener)
        except OSError as exc:
            log.warning("accept_failed", reason=exc.strerror or str(exc))
            await asyncio.sleep(RETRY_AFTER)
            continue
        accepted(connection, address)
