"""Reading and writing protocol messages on a stream (the asyncio side of the codec)."""

from __future__ import annotations

import asyncio

from cloudbridge_core.errors import ProtocolViolation, TransportClosed
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Stream


class MessageStream:
    """A stream that carries length-prefixed protocol messages."""

    def __init__(self, stream: Stream, max_size: int = messages.MAX_MESSAGE_SIZE) -> None:
        self.stream = stream
        self._reader = messages.MessageReader(max_size)
        self._writing = asyncio.Lock()

    def allow(self, max_size: int) -> None:
        """Take messages of up to ``max_size`` bytes from now on (after authentication)."""
        self._reader.max_size = max_size

    async def send(self, message: messages.Message) -> None:
        async with self._writing:  # a message is one write, never interleaved with another
            await self.stream.write(messages.encode(message))

    async def receive(self) -> messages.Message:
        """The next message; ``TransportClosed`` if the stream ends first."""
        while (message := self._reader.next_message()) is None:
            data = await self.stream.read()
            if not data:
                raise TransportClosed("the stream ended before a complete message")
            self._reader.feed(data)
        return message

    async def expect(self, *kinds: type[messages.Message]) -> messages.Message:
        message = await self.receive()
        if not isinstance(message, kinds):
            names = " or ".join(k.TYPE for k in kinds)
            raise ProtocolViolation(f"expected {names}, got {message.TYPE}")
        return message

    def take_buffered(self) -> bytes:
        """Raw bytes that arrived after the last message (a tunnel's first data)."""
        return self._reader.take_buffered()
