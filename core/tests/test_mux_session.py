"""The multiplexer's sessions over an in-memory pipe whose sends take a few loop turns, as
a socket's do when its buffer is full: flow control must not lose a window update that
arrives while a writer is still flushing."""

from __future__ import annotations

import asyncio

from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.transports.mux_session import MuxSession

#: loop turns each send takes (a flush that waits for the socket to drain)
SEND_TURNS = 20


class SlowPipe:
    """One end of an in-memory pipe pair."""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self._inbox = inbox
        self._outbox = outbox

    async def receive(self) -> bytes:
        return await self._inbox.get()

    async def send(self, data: bytes | bytearray) -> None:
        self._outbox.put_nowait(bytes(data))
        for _ in range(SEND_TURNS):
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self._outbox.put_nowait(b"")


def test_a_window_update_during_a_flush_wakes_the_writer() -> None:
    limits = MuxLimits(initial_window=64 * 1024, max_frame_size=16 * 1024)
    total = 64 * limits.initial_window

    async def scenario() -> None:
        there: asyncio.Queue[bytes] = asyncio.Queue()
        back: asyncio.Queue[bytes] = asyncio.Queue()
        writer_side = MuxSession(SlowPipe(back, there), is_dialer=True, limits=limits)
        reader_side = MuxSession(SlowPipe(there, back), is_dialer=False, limits=limits)
        stream = await writer_side.open_stream()
        writing = asyncio.create_task(stream.write(b"x" * total))
        peer = await reader_side.accept_stream()
        received = 0
        while received < total:
            received += len(await asyncio.wait_for(peer.read(), 5))
        await asyncio.wait_for(writing, 5)
        await writer_side.aclose()
        await reader_side.aclose()

    asyncio.run(scenario())
