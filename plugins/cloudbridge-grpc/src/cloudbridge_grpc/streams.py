"""One CloudBridge stream = one gRPC ``Stream`` call; the end of each side is said in-band."""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from cloudbridge_core.api import (
    ProtocolViolation,
    StreamAborted,
    TransportClosed,
    TransportError,
)

from cloudbridge_grpc._generated.tunnel_pb2 import Chunk

#: messages read ahead of the stream's reader; with gRPC's own HTTP/2 window this bounds
#: what a peer can make us buffer per stream (x max_message_bytes)
READ_AHEAD = 2
_EOF = Chunk(eof=True)


class _ChunkStream(abc.ABC):
    """What both ends share: reads until the peer's eof chunk, writes in bounded pieces.

    A pump task does the gRPC reads, because grpcio cancels the whole call when a task
    waiting in a read is cancelled: a caller's ``wait_for(stream.read(), ...)`` timing
    out must not reset the stream. After the eof chunk the pump reads on until the call
    ends, so that a reset after the peer's eof (a call ended with an error) still fails
    the reader who has not reached that eof yet, and the writer.
    """

    def __init__(self, piece: int) -> None:
        self._piece = piece
        self._pending = b""
        self._inbound: asyncio.Queue[Chunk | None] = asyncio.Queue(READ_AHEAD)
        self._pump: asyncio.Task[None] | None = None
        self._pump_ended = False
        self._peer_eof = False  # the pump saw the peer's eof chunk
        self._eof_read = False  # ... and the reader got to it
        self._eof_sent = False
        self._error: TransportError | None = None

    @abc.abstractmethod
    async def _read_message(self) -> Chunk | None:
        """The peer's next chunk, ``None`` when the call ended; raises ``TransportError``."""

    @abc.abstractmethod
    async def _send(self, chunk: Chunk) -> None:
        """Send one chunk on the call, waiting for gRPC's flow control."""

    def _start_pump(self) -> None:
        self._pump = asyncio.create_task(self._pump_messages())

    async def _pump_messages(self) -> None:
        try:
            while (chunk := await self._read_message()) is not None:
                if self._peer_eof:
                    raise ProtocolViolation("a chunk after the peer's eof")
                await self._inbound.put(chunk)
                if chunk.eof:
                    self._peer_eof = True
                    self._both_sides_finished()
        except TransportError as error:
            self._error = self._error or error
        finally:
            self._pump_ended = True
            self._wake_reader()

    def _wake_reader(self) -> None:
        # a blocked reader means an empty queue, so there is room; a full queue is drained
        # by a reader that then finds the pump ended (see _next_chunk)
        with contextlib.suppress(asyncio.QueueFull):
            self._inbound.put_nowait(None)

    async def _next_chunk(self) -> Chunk | None:
        if self._inbound.empty() and self._pump_ended:
            return None
        return await self._inbound.get()

    @abc.abstractmethod
    def _both_sides_finished(self) -> None:
        """Called when this side or the peer ended its data; the server ends the call."""

    @property
    def finished(self) -> bool:
        return self._eof_sent and self._peer_eof

    def fail(self, error: TransportError) -> None:
        """End the stream for its reader and writer (the session ended, a reset arrived)."""
        self._error = self._error or error
        self._wake_reader()

    async def aclose(self) -> None:
        """Close gracefully (the eof chunk) once the peer's eof has arrived, otherwise reset."""
        if self._error is None and self._peer_eof:
            with contextlib.suppress(TransportError):  # the call ended meanwhile
                await self.close_write()
            return
        await self.reset()

    @abc.abstractmethod
    async def reset(self) -> None:
        """End the call with an error for the peer, unless both sides had finished."""

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self._eof_read:
                return b""
            chunk = await self._next_chunk()
            if chunk is None:  # the call ended without the peer's eof
                raise self._error or StreamAborted("the peer reset the stream")
            self._pending = chunk.data
            self._eof_read = chunk.eof
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._eof_sent:
            raise TransportError("write after close_write")
        view = memoryview(data)
        for start in range(0, len(view), self._piece):
            await self._send(Chunk(data=bytes(view[start : start + self._piece])))

    async def close_write(self) -> None:
        if not self._eof_sent and self._error is None:
            self._eof_sent = True
            await self._send(_EOF)
            self._both_sides_finished()


class ClientStream(_ChunkStream):
    """The caller's side of a ``Stream`` call."""

    def __init__(self, call: Any, piece: int) -> None:
        super().__init__(piece)
        self._call = call
        self._start_pump()

    async def _read_message(self) -> Chunk | None:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _error_of(exc) from None
        except asyncio.CancelledError:
            if not _being_cancelled():
                return None  # the call was cancelled (see _send): fail() or aclose() said why
            raise
        return None if message is grpc.aio.EOF else message

    async def _send(self, chunk: Chunk) -> None:
        try:
            await self._call.write(chunk)
            if chunk.eof:
                await self._call.done_writing()
        except grpc.aio.AioRpcError as exc:
            self._error = self._error or _error_of(exc)
            raise self._error from None
        except asyncio.InvalidStateError:  # the call ended: its status is the pump's to read
            self._error = self._error or StreamAborted("the stream has ended")
            raise self._error from None
        except asyncio.CancelledError:
            # grpc's own, not our task's: the call was cancelled here, by fail() or as the
            # session closed; its status may say INTERNAL (a send that failed under the
            # cancel), so call.cancelled() cannot tell
            if not _being_cancelled():
                raise self._error or StreamAborted("the stream was reset") from None
            raise

    def fail(self, error: TransportError) -> None:
        super().fail(error)
        self._call.cancel()

    async def reset(self) -> None:
        """Cancel the call (the server's reader and writer fail), unless it is finishing."""
        if self._error is None and self.finished:  # the server ends the call with OK
            super().fail(StreamAborted("the stream was reset locally"))
        elif self._error is None:
            self.fail(StreamAborted("the stream was reset locally"))

    def _both_sides_finished(self) -> None:
        """Nothing to do: a client's call ends when both sides have sent their eof."""


class ServerStream(_ChunkStream):
    """The server's side; the call's handler waits for ``done``, then ends the call."""

    def __init__(self, context: Any, piece: int) -> None:
        super().__init__(piece)
        self._context = context
        self.done = asyncio.Event()
        #: how the call ends when not with OK: an abort the client reads as the right error
        self.abort_status: tuple[grpc.StatusCode, str] | None = None
        #: bytes the peer may still send before it is authenticated (``None``: no limit),
        #: and what is told when it sends more (its session ends)
        self.preauth_room: int | None = None
        self.over_preauth: Callable[[ProtocolViolation], None] | None = None
        self._start_pump()

    async def _read_message(self) -> Chunk | None:
        try:
            message = await self._context.read()
        except (grpc.aio.BaseError, RuntimeError) as exc:  # the call was cancelled or ended
            raise self._error or StreamAborted(f"the stream has ended: {exc}") from None
        if message is grpc.aio.EOF:
            return None
        chunk: Chunk = message
        if self.preauth_room is not None:
            self.preauth_room -= len(chunk.data)
            if self.preauth_room < 0:
                violation = ProtocolViolation("more than a hello before authentication")
                if self.over_preauth is not None:
                    self.over_preauth(violation)
                raise violation
        return chunk

    async def _send(self, chunk: Chunk) -> None:
        try:
            await self._context.write(chunk)
        except (grpc.aio.BaseError, RuntimeError) as exc:  # the call was cancelled or ended
            self._error = self._error or StreamAborted(f"the stream has ended: {exc}")
            raise self._error from None

    def _both_sides_finished(self) -> None:
        if self.finished:
            self.done.set()

    def fail(self, error: TransportError) -> None:
        super().fail(error)
        if isinstance(error, TransportClosed):
            self.abort_status = (grpc.StatusCode.UNAVAILABLE, "the session ended")
        elif isinstance(error, ProtocolViolation):
            self.abort_status = (grpc.StatusCode.INVALID_ARGUMENT, error.message)
        self.done.set()

    def call_ended(self) -> None:
        """The handler is returning: no more messages will come."""
        if self._pump is not None:
            self._pump.cancel()

    async def reset(self) -> None:
        """End the call with ABORTED (the client reads a reset), unless both sides finished."""
        if self._error is None:
            if not self.finished:
                self.abort_status = (grpc.StatusCode.ABORTED, "the stream was reset")
            self.fail(StreamAborted("the stream was reset locally"))


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _error_of(exc: grpc.aio.AioRpcError) -> TransportError:
    code = exc.code()
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
        return StreamAborted(f"the stream was reset: {exc.details()}")
    if code is grpc.StatusCode.UNAVAILABLE:
        return TransportClosed(f"the gRPC session ended: {exc.details()}")
    return TransportError(f"gRPC {code.name}: {exc.details()}")
