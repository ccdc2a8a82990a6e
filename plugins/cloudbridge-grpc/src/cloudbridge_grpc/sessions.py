"""Sessions: a ``Session`` control call ties a client's ``Stream`` calls together.

Servers cannot start calls, so a server that opens a stream asks the client to, on the
control call (``Control.open_reverse``); the client's call carries the number back in its
metadata. When the control call ends, the session ends, and every stream of it with it.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any

import grpc
from cloudbridge_core.api import Admission, ProtocolViolation, TransportClosed, TransportError

from cloudbridge_grpc._generated.tunnel_pb2 import Chunk, Control
from cloudbridge_grpc.streams import ClientStream, ServerStream

SESSION_HEADER = "cloudbridge-session"
REVERSE_HEADER = "cloudbridge-reverse"
STREAM_METHOD = "/cloudbridge.v1.Tunnel/Stream"
#: seconds a client waits for its channel to close
CLOSE_TIMEOUT = 5.0
#: channel closes still running after CLOSE_TIMEOUT (kept referenced until they end)
_CLOSING: set[asyncio.Future[None]] = set()
SESSION_METHOD = "/cloudbridge.v1.Tunnel/Session"
#: stream bytes a peer not yet authenticated may send: its hello (16 KiB) and more than
#: enough room around it. A security limit, as the core multiplexer's preauth_window.
PREAUTH_BYTES = 32 * 1024


class _Incoming:
    """Streams the peer opened, until the session ends."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.error: TransportError | None = None

    def put(self, stream: Any) -> None:
        self._queue.put_nowait(stream)

    def end(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
            self._queue.put_nowait(None)

    async def get(self) -> Any:
        stream = await self._queue.get() if self.error is None else None
        if stream is None:
            self._queue.put_nowait(None)  # later callers learn it too
            raise self.error or TransportClosed("the gRPC session ended")
        return stream


class ClientSession:
    """Implements :class:`~cloudbridge_core.providers.Session` over a gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel, session_id: str, piece: int) -> None:
        self._channel = channel
        self._metadata = ((SESSION_HEADER, session_id),)
        self._piece = piece
        self._open_call = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=Chunk.SerializeToString,
            response_deserializer=Chunk.FromString,
        )
        self._control: Any = channel.stream_stream(
            SESSION_METHOD,
            request_serializer=Control.SerializeToString,
            response_deserializer=Control.FromString,
        )(metadata=self._metadata)
        self._incoming = _Incoming()
        self._streams: weakref.WeakSet[ClientStream] = weakref.WeakSet()
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Wait for the server's acknowledgement, then follow its requests."""
        acknowledgement = await self._control.read()
        if acknowledgement is grpc.aio.EOF:
            raise TransportError("the gRPC server did not accept the session")
        self._listener = asyncio.create_task(self._follow_requests())

    async def _follow_requests(self) -> None:
        ended = TransportClosed("the gRPC session ended")
        try:
            while (request := await self._control.read()) is not grpc.aio.EOF:
                reverse = (REVERSE_HEADER, str(request.open_reverse))
                self._incoming.put(self._stream([*self._metadata, reverse]))
        except grpc.aio.AioRpcError as exc:
            ended = TransportClosed(f"the gRPC session ended: {exc.details()}")
        finally:
            self._end(ended)

    def _end(self, error: TransportError) -> None:
        self._incoming.end(error)
        for stream in list(self._streams):
            stream.fail(error)

    def _stream(self, metadata: list[tuple[str, str]]) -> ClientStream:
        stream = ClientStream(self._open_call(metadata=tuple(metadata)), self._piece)
        self._streams.add(stream)
        return stream

    async def open_stream(self) -> ClientStream:
        if self._incoming.error is not None:
            raise self._incoming.error
        return self._stream(list(self._metadata))

    async def accept_stream(self) -> ClientStream:
        stream: ClientStream = await self._incoming.get()
        return stream

    def authenticated(self) -> None:
        """A client's session holds no pre-auth budget: nothing to lift."""

    async def aclose(self) -> None:
        # the control call first: the server then fails the streams as "session closed",
        # not as reset one by one
        self._control.cancel()
        self._end(TransportClosed("the session was closed"))
        # bounded, and without waiting for a cancellation to be honoured (wait_for would):
        # gRPC's calls and channel close can hang when the server died mid-call
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=CLOSE_TIMEOUT)
        closing = asyncio.ensure_future(self._channel.close())
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)
        await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)


class ServerSession:
    """The server's view of one client session.

    With an ``admission`` the session is held to the relay's pre-auth budget until
    :meth:`authenticated`: one stream carrying :data:`PREAUTH_BYTES` at most (the hello),
    nothing read on the control call, and the session ends at the admission's deadline."""

    def __init__(
        self,
        context: Any,
        piece: int,
        admission: Admission | None = None,
        peer_address: str | None = None,
    ) -> None:
        #: the peer's IP address (the relay limits request rates per address too)
        self.peer_address = peer_address
        self._admission = admission
        self._accepted = 0
        if admission is not None:
            admission.watch(self._expired)
        self._context = context
        self._piece = piece
        self._incoming = _Incoming()
        self._reverse_numbers = itertools.count(1)
        self._reverse_waiting: dict[int, asyncio.Future[ServerStream]] = {}
        self._streams: weakref.WeakSet[ServerStream] = weakref.WeakSet()
        #: set when the session ends, whichever side ended it: the control call then ends
        self.ended = asyncio.Event()
        #: set once the pre-auth budget is lifted (at once without an admission): only then
        #: is the control call read, so a stranger's messages there are not even assembled
        self.lifted = asyncio.Event()
        if admission is None:
            self.lifted.set()

    def stream_arrived(self, stream: ServerStream, reverse: str | None) -> None:
        self._streams.add(stream)
        if self._admission is not None and (self._accepted or reverse is not None):
            self.end(ProtocolViolation("a second stream before authentication"))
        if self._incoming.error is not None:
            stream.fail(self._incoming.error)
            return
        self._accepted += 1
        if self._admission is not None:
            stream.preauth_room = PREAUTH_BYTES
            stream.over_preauth = self.end
        waiting = self._reverse_waiting.pop(_number(reverse), None) if reverse else None
        if waiting is not None and not waiting.done():
            waiting.set_result(stream)
        elif reverse is None:
            self._incoming.put(stream)
        else:
            stream.fail(ProtocolViolation("a reverse stream nobody asked for"))

    async def open_stream(self) -> ServerStream:
        if self._incoming.error is not None:
            raise self._incoming.error
        number = next(self._reverse_numbers)
        arrived = self._reverse_waiting[number] = asyncio.get_running_loop().create_future()
        try:
            await self._context.write(Control(open_reverse=number))
            stream: ServerStream = await arrived
            return stream
        except (grpc.aio.BaseError, RuntimeError) as exc:  # the control call ended
            raise TransportClosed(f"the gRPC session ended: {exc}") from None
        finally:
            self._reverse_waiting.pop(number, None)

    async def accept_stream(self) -> ServerStream:
        stream: ServerStream = await self._incoming.get()
        return stream

    def authenticated(self) -> None:
        """The relay authenticated the peer: lift the pre-auth budget. Idempotent."""
        self._end_preauth()
        for stream in self._streams:
            stream.preauth_room = stream.over_preauth = None
        self.lifted.set()

    def _expired(self) -> None:
        self._admission = None  # counted and released by the admission itself
        self.end(TransportClosed("no authentication within the pre-auth deadline"))

    def _end_preauth(self) -> None:
        if self._admission is not None:
            self._admission.release()
            self._admission = None

    def end(self, error: TransportError) -> None:
        self._end_preauth()
        self._incoming.end(error)
        for waiting in self._reverse_waiting.values():
            if not waiting.done():
                waiting.set_exception(error)
        for stream in list(self._streams):
            stream.fail(error)
        self.ended.set()

    async def aclose(self) -> None:
        self.end(TransportClosed("the session was closed"))


def _number(reverse: str) -> int:
    """The number in a ``cloudbridge-reverse`` header; 0 (never asked for) when garbled."""
    try:
        return int(reverse)
    except ValueError:
        return 0
