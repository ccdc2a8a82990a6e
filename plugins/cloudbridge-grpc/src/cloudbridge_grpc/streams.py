"""One CloudBridge stream = one gRPC ``Stream`` call; the end of each side is said in-band."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from cloudbridge_core.errors import StreamAborted, TransportClosed, TransportError

from cloudbridge_grpc._generated.tunnel_pb2 import Chunk

#: messages a server-side stream buffers ahead of its reader (memory bound: x the chunk size)
READ_AHEAD = 8
_EOF = Chunk(eof=True)


class _ChunkStream:
    """What both ends share: reads until the peer's eof chunk, writes in bounded pieces."""

    def __init__(self, piece: int) -> None:
        self._piece = piece
        self._pending = b""
        self._eof_received = False
        self._eof_sent = False
        self._error: TransportError | None = None

    async def _next_chunk(self) -> Chunk | None:
        raise NotImplementedError

    async def _send(self, chunk: Chunk) -> None:
        raise NotImplementedError

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self._eof_received:
                return b""
            chunk = await self._next_chunk()
            if chunk is None:  # the call ended without the peer's eof
                raise self._error or StreamAborted("the peer reset the stream")
            self._pending = chunk.data
            self._eof_received = chunk.eof
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

    @property
    def finished(self) -> bool:
        return self._eof_sent and self._eof_received


class ClientStream(_ChunkStream):
    """The caller's side of a ``Stream`` call."""

    def __init__(self, call: Any, piece: int) -> None:
        super().__init__(piece)
        self._call = call

    async def _next_chunk(self) -> Chunk | None:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._error = _error_of(exc)
            raise self._error from None
        except asyncio.CancelledError:
            if self._call.cancelled() and not _being_cancelled():
                raise StreamAborted("the stream was reset") from None
            raise
        return None if message is grpc.aio.EOF else message

    async def _send(self, chunk: Chunk) -> None:
        try:
            await self._call.write(chunk)
        except grpc.aio.AioRpcError as exc:
            self._error = _error_of(exc)
            raise self._error from None
        except asyncio.InvalidStateError:
            raise StreamAborted("the stream has ended") from None
        if chunk.eof:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()

    async def aclose(self) -> None:
        if not self.finished:
            self._call.cancel()  # a reset: the server's reader fails
        self._error = self._error or StreamAborted("the stream was closed")


class ServerStream(_ChunkStream):
    """The server's side: the call's handler reads ahead into a bounded queue."""

    def __init__(self, context: Any, piece: int) -> None:
        super().__init__(piece)
        self._context = context
        self._inbound: asyncio.Queue[Chunk | None] = asyncio.Queue(READ_AHEAD)
        self.done = asyncio.Event()
        self.reset = False

    async def pump_requests(self) -> None:
        """Run by the call's handler: move the client's chunks to the queue."""
        try:
            while True:
                message = await self._context.read()
                if message is grpc.aio.EOF:
                    break
                await self._inbound.put(message)
                if message.eof:
                    return
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._inbound.put_nowait(None)

    def reset_by_peer(self) -> None:
        self._error = self._error or StreamAborted("the peer reset the stream")
        with contextlib.suppress(asyncio.QueueFull):
            self._inbound.put_nowait(None)
        self.done.set()

    async def _next_chunk(self) -> Chunk | None:
        return await self._inbound.get()

    async def _send(self, chunk: Chunk) -> None:
        try:
            await self._context.write(chunk)
        except (grpc.aio.AbortError, grpc.aio.UsageError, RuntimeError) as exc:
            raise StreamAborted(f"the stream has ended: {exc}") from None
        if self.finished:
            self.done.set()

    async def read(self, max_bytes: int = 65536) -> bytes:
        data = await super().read(max_bytes)
        if self.finished:
            self.done.set()
        return data

    async def aclose(self) -> None:
        if not self.finished:
            self._error = self._error or StreamAborted("the stream was closed")
            self.reset = True
        self.done.set()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _error_of(exc: grpc.aio.AioRpcError) -> TransportError:
    code = exc.code()
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
        return StreamAborted(f"the stream was reset: {exc.details()}")
    if code is grpc.StatusCode.UNAVAILABLE:
        return TransportClosed(f"the gRPC connection ended: {exc.details()}")
    return TransportError(f"gRPC {code.name}: {exc.details()}")
