"""A tunnel's stream before the relay has answered its ``open``.

The client does not wait for the relay's ``accept`` before it carries the application's
bytes: they follow the ``open`` at once (those already sent in the same record) and the
relay holds them, within the stream's window, until the target is connected. That saves
a round trip through the relay on every setup. What the relay sends back starts with its
answer, which :class:`OpeningStream` takes off the front: ``accept`` lets the target's
bytes through, ``reject`` fails the stream with the relay's error (the pump then resets
the application's connection, as a refused one always was).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from cloudbridge_core.errors import (
    CloudBridgeError,
    ProtocolViolation,
    TransportClosed,
    error_for_code,
)
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Stream
from cloudbridge_core.pump import DirectStream, StreamSink


class OpeningStream:
    """A stream whose first bytes in are the relay's answer to its ``open``.

    A :class:`~cloudbridge_core.providers.Stream`, and a direct one (see
    :class:`~cloudbridge_core.pump.DirectStream`) when the stream it wraps is. ``accepted``
    is called once the relay accepts; :attr:`refused` holds the error the stream failed
    with when the relay refused or never answered.
    """

    def __init__(self, stream: Stream, accepted: Callable[[], None]) -> None:
        self._stream = stream
        self._accepted = accepted
        #: the answer's bytes so far; None once it is read
        self._answer: messages.MessageReader | None = messages.MessageReader()
        self._sink: StreamSink | None = None
        self.refused: CloudBridgeError | None = None

    def _take_answer(self, data: bytes) -> bytes:
        """Read the answer from ``data``; return what follows it (the target's first bytes).

        Raises the relay's refusal, ``ProtocolViolation`` for anything but an answer and
        ``TransportClosed`` when the stream ends before one.
        """
        answer = self._answer
        assert answer is not None  # only called until the answer is read
        if self.refused is not None:  # the end of a refused stream: still refused
            raise self.refused
        try:
            if not data:
                raise TransportClosed("the relay ended the tunnel's stream without an answer")
            answer.feed(data)
            reply = answer.next_message()
            if reply is None:
                return b""
            if isinstance(reply, messages.Reject):
                raise error_for_code(reply.code, reply.message)
            if not isinstance(reply, messages.Accept):
                raise ProtocolViolation(f"expected accept or reject, got {reply.TYPE}")
        except CloudBridgeError as error:
            self.refused = error
            raise
        self._answer = None
        self._accepted()
        return answer.take_buffered()

    # the Stream, for the two-task pump

    async def read(self, max_bytes: int = 65536) -> bytes:
        while self._answer is not None:
            if rest := self._take_answer(await self._stream.read(max_bytes)):
                return rest
        return await self._stream.read(max_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.write(data)

    async def close_write(self) -> None:
        await self._stream.close_write()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await self._stream.reset()

    # the DirectStream, for the pump without tasks

    @property
    def direct(self) -> bool:
        return getattr(self._stream, "direct", False) is True

    def _direct(self) -> DirectStream:
        return cast(DirectStream, self._stream)

    def attach(self, sink: StreamSink) -> None:
        self._sink = sink
        # until the answer is read this stream is the sink in between; then the pump's own
        self._direct().attach(self if self._answer is not None else sink)

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        return self._direct().send_now(data)

    def consume(self, count: int) -> None:
        self._direct().consume(count)

    def when_writable(self, callback: Callable[[], None]) -> bool:
        return self._direct().when_writable(callback)

    def close_write_now(self) -> None:
        self._direct().close_write_now()

    def reset_now(self) -> None:
        self._direct().reset_now()

    # the sink in between (StreamSink), while the answer is awaited

    def deliver(self, data: bytes) -> None:
        sink = self._sink
        assert sink is not None  # attached before anything is delivered
        if self._answer is None:  # what the stream had buffered behind the answer
            sink.deliver(data)
            return
        try:
            rest = self._take_answer(data)
        except CloudBridgeError as error:
            sink.fail(error)
            return
        # the answer's bytes are taken here, not by the sink: the relay may send that much more
        self._direct().consume(len(data) - len(rest))
        if self._answer is None:
            self._direct().attach(sink)  # from now on straight to the pump
            if rest:
                sink.deliver(rest)

    def end(self) -> None:
        assert self._sink is not None
        if self._answer is None:
            self._sink.end()
            return
        try:
            self._take_answer(b"")
        except CloudBridgeError as error:
            self._sink.fail(error)

    def fail(self, error: Exception) -> None:
        assert self._sink is not None
        self._sink.fail(error)

    def window_opened(self) -> None:
        assert self._sink is not None
        self._sink.window_opened()
