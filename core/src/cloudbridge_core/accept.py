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


async def accept_forever(
    listener: socket.socket, accepted: Callable[[socket.socket, object], None]
) -> None:
    """Call ``accepted(connection, address)`` for each connection, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            connection, address = await loop.sock_accept(listener)
        except OSError as exc:
            log.warning("accept_failed", reason=exc.strerror or str(exc))
            await asyncio.sleep(RETRY_AFTER)
            continue
        accepted(connection, address)
