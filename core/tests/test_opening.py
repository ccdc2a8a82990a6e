"""A tunnel's stream before the relay has answered its open (``client/opening.py``).

The client's session runs over an in-memory pipe, and the relay's side is the sans-IO
multiplexer, so that each case chooses exactly how the answer arrives: before the pump
attaches, split across frames, with the target's first bytes behind it in one frame. A
refusal, and a stream that ends without an answer, fail the stream with the relay's error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from cloudbridge_core.client.opening import OpeningStream
from cloudbridge_core.errors import TargetUnreachable, TransportClosed
from cloudbridge_core.protocol import messages, mux
from cloudbridge_core.transports.mux_session import MuxSession, MuxStream, PipeReceiver

OPEN = messages.encode(messages.Open("127.0.0.1:7"))
ACCEPT = messages.encode(messages.Accept())


class MemoryPipe:
    """A direct pipe that keeps what the session writes for the test's relay."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.writing_paused = False

    def attach(self, receiver: PipeReceiver) -> None:
        pass

    def write_now(self, data: bytes | bytearray) -> None:
        self.written += data

    def hold(self, reason: str) -> None:
        pass

    def release(self, reason: str) -> None:
        pass

    async def receive(self) -> bytes:
        raise AssertionError("a direct session is delivered to, never reads")

    async def send(self, data: bytes | bytearray) -> None:
        self.written += data

    async def aclose(self) -> None:
        pass


class Relay:
    """The relay's end of the session, sans-IO."""

    def __init__(self, pipe: MemoryPipe, session: MuxSession) -> None:
        self._pipe = pipe
        self._session = session
        self._connection = mux.MuxConnection(is_dialer=False)

    def receive(self) -> list[mux.Event]:
        events = self._connection.receive_data(bytes(self._pipe.written))
        self._pipe.written.clear()
        return events

    def send(self, stream_id: int, *frames: bytes) -> None:
        for frame in frames:
            self._connection.send_data(stream_id, frame)
        self._session.pipe_data(bytes(self._connection.data_to_send()))

    def end(self, stream_id: int) -> None:
        self._connection.end_stream(stream_id)
        self._session.pipe_data(bytes(self._connection.data_to_send()))


class Sink:
    """The pump's side of a direct stream: records what reaches it."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.ended = False
        self.failed: Exception | None = None

    def deliver(self, data: bytes) -> None:
        self.delivered.append(data)

    def end(self) -> None:
        self.ended = True

    def fail(self, error: Exception) -> None:
        self.failed = error

    def window_opened(self) -> None:
        pass


Case = Callable[[Relay, MuxStream, OpeningStream, list[str]], Awaitable[None]]


def run(case: Case) -> None:
    """Open a tunnel's stream carrying a request behind its open, then run ``case``."""

    async def main() -> None:
        pipe = MemoryPipe()
        session = MuxSession(pipe, is_dialer=True)
        relay = Relay(pipe, session)
        stream = await session.open_stream()
        assert isinstance(stream, MuxStream)
        await stream.write(OPEN + b"request")
        opened, carried = relay.receive()
        assert opened == mux.StreamOpened(stream.stream_id)
        # the request rides with the open: no waiting for the relay's answer
        assert carried == mux.DataReceived(stream.stream_id, OPEN + b"request")
        accepted: list[str] = []
        opening = OpeningStream(stream, lambda: accepted.append("accepted"))
        await case(relay, stream, opening, accepted)

    asyncio.run(main())


def test_an_answer_and_data_that_came_before_the_pump_attached() -> None:
    async def case(
        relay: Relay, stream: MuxStream, opening: OpeningStream, accepted: list[str]
    ) -> None:
        relay.send(stream.stream_id, ACCEPT, b"answer")  # two frames, buffered
        sink = Sink()
        opening.attach(sink)
        assert accepted == ["accepted"]
        assert sink.delivered == [b"answer"]
        relay.send(stream.stream_id, b"more")  # from now on straight to the pump's sink
        relay.end(stream.stream_id)
        assert sink.delivered == [b"answer", b"more"]
        assert sink.ended
        assert sink.failed is None
        assert opening.refused is None

    run(case)


def test_an_answer_split_across_frames_with_data_behind_it() -> None:
    async def case(
        relay: Relay, stream: MuxStream, opening: OpeningStream, accepted: list[str]
    ) -> None:
        sink = Sink()
        opening.attach(sink)
        relay.send(stream.stream_id, ACCEPT[:3])
        assert accepted == []
        assert sink.delivered == []
        relay.send(stream.stream_id, ACCEPT[3:] + b"first")
        assert accepted == ["accepted"]
        assert sink.delivered == [b"first"]

    run(case)


def test_a_refusal_fails_the_stream_with_the_relays_error() -> None:
    async def case(
        relay: Relay, stream: MuxStream, opening: OpeningStream, accepted: list[str]
    ) -> None:
        sink = Sink()
        opening.attach(sink)
        refusal = messages.Reject("unreachable", "cannot connect to 127.0.0.1:7")
        relay.send(stream.stream_id, messages.encode(refusal))
        relay.end(stream.stream_id)
        assert isinstance(sink.failed, TargetUnreachable)
        assert opening.refused is sink.failed
        assert sink.delivered == []
        assert accepted == []

    run(case)


def test_a_stream_ended_without_an_answer_fails() -> None:
    async def case(
        relay: Relay, stream: MuxStream, opening: OpeningStream, accepted: list[str]
    ) -> None:
        sink = Sink()
        opening.attach(sink)
        relay.end(stream.stream_id)
        assert isinstance(sink.failed, TransportClosed)
        assert opening.refused is sink.failed
        assert not sink.ended

    run(case)


def test_reads_return_what_follows_the_answer() -> None:
    async def case(
        relay: Relay, stream: MuxStream, opening: OpeningStream, accepted: list[str]
    ) -> None:
        relay.send(stream.stream_id, ACCEPT[:5])
        relay.send(stream.stream_id, ACCEPT[5:], b"first")
        assert await opening.read() == b"first"
        assert accepted == ["accepted"]
        relay.end(stream.stream_id)
        assert await opening.read() == b""

    run(case)


def test_reads_raise_the_refusal() -> None:
    async def case(
        relay: Relay, stream: MuxStream, opening: OpeningStream, accepted: list[str]
    ) -> None:
        refusal = messages.Reject("unreachable", "cannot connect to 127.0.0.1:7")
        relay.send(stream.stream_id, messages.encode(refusal))
        with pytest.raises(TargetUnreachable):
            await opening.read()
        assert isinstance(opening.refused, TargetUnreachable)
        assert accepted == []

    run(case)


def test_the_relays_accept_goes_out_with_the_next_write() -> None:
    """The relay's side: a stream's accept queued with ``send_soon`` shares the write of
    the target's first bytes (one record), or goes alone once ``within`` has passed."""

    async def main() -> None:
        pipe = MemoryPipe()
        writes: list[bytes] = []
        wrote = asyncio.Event()

        def write_now(data: bytes | bytearray) -> None:
            writes.append(bytes(data))
            wrote.set()

        pipe.write_now = write_now  # type: ignore[method-assign]
        relay = MuxSession(pipe, is_dialer=False)
        client = mux.MuxConnection(is_dialer=True)
        for stream_id in (client.open_stream(), client.open_stream()):
            client.send_data(stream_id, OPEN)
        relay.pipe_data(bytes(client.data_to_send()))
        first, second = await relay.accept_stream(), await relay.accept_stream()
        assert isinstance(first, MuxStream)
        assert isinstance(second, MuxStream)

        first.send_soon(ACCEPT, within=60.0)
        assert writes == []
        first.send_now(b"target's first bytes")
        assert len(writes) == 1
        events = client.receive_data(writes[0])
        data = [event.data for event in events if isinstance(event, mux.DataReceived)]
        assert data == [ACCEPT, b"target's first bytes"]

        wrote.clear()
        second.send_soon(ACCEPT, within=0.01)
        await asyncio.wait_for(wrote.wait(), 10)  # nothing else writes: the deadline does
        events = client.receive_data(writes[1])
        assert [event.data for event in events if isinstance(event, mux.DataReceived)] == [ACCEPT]

    asyncio.run(main())
