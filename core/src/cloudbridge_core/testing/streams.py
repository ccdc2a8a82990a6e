"""Stream helpers for testing transports: read to the end, echo every stream of a session."""

from __future__ import annotations

import asyncio

from cloudbridge_core.errors import TransportError
from cloudbridge_core.providers import Session, Stream


async def read_all(stream: Stream) -> bytes:
    """Everything the peer sends until it half-closes."""
    chunks = []
    while chunk := await stream.read():
        chunks.append(chunk)
    return b"".join(chunks)


async def echo_streams(session: Session) -> None:
    """A session handler that echoes every stream back, until the session ends."""

    async def echo(stream: Stream) -> None:
        await stream.write(await read_all(stream))
        await stream.close_write()

    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            task = asyncio.create_task(echo(await session.accept_stream()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except TransportError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
