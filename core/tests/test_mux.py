"""The multiplexer's state machine, fed bytes directly: fast and deterministic."""

from __future__ import annotations

import pytest
from cloudbridge_core.errors import ProtocolViolation
from cloudbridge_core.protocol import mux
from hypothesis import given, settings
from hypothesis import strategies as st

LIMITS = mux.MuxLimits(max_frame_size=1024, initial_window=4096, max_streams=4)


def pair() -> tuple[mux.MuxConnection, mux.MuxConnection]:
    return mux.MuxConnection(True, LIMITS), mux.MuxConnection(False, LIMITS)


def deliver(sender: mux.MuxConnection, receiver: mux.MuxConnection) -> list[mux.Event]:
    return receiver.receive_data(sender.data_to_send())


def test_open_send_half_close_both_ways() -> None:
    client, server = pair()
    stream = client.open_stream()
    assert stream == 1
    assert client.send_data(stream, b"hello") == 5
    client.end_stream(stream)
    assert deliver(client, server) == [
        mux.StreamOpened(1),
        mux.DataReceived(1, b"hello"),
        mux.StreamEnded(1),
    ]
    server.send_data(1, b"world")
    server.end_stream(1)
    assert deliver(server, client) == [mux.DataReceived(1, b"world"), mux.StreamEnded(1)]
    assert not client.has_stream(1)
    assert not server.has_stream(1)
    assert server.open_stream() == 2


def test_flow_control_window_and_updates() -> None:
    client, server = pair()
    stream = client.open_stream()
    assert client.send_data(stream, b"x" * 10_000) == 4096  # the peer's whole window
    events = deliver(client, server)
    assert sum(len(e.data) for e in events if isinstance(e, mux.DataReceived)) == 4096
    assert max(len(e.data) for e in events if isinstance(e, mux.DataReceived)) == 1024
    assert client.send_data(stream, b"x") == 0
    server.stream_consumed(stream, 1000)
    assert server.data_to_send() == b""  # updates are batched
    server.stream_consumed(stream, 1048)
    assert deliver(server, client) == [mux.WindowUpdated(stream)]
    assert client.send_window(stream) == 2048


def test_reset_and_ping() -> None:
    client, server = pair()
    stream = client.open_stream()
    deliver(client, server)
    server.reset_stream(stream)
    assert deliver(server, client) == [mux.StreamReset(stream)]
    client.ping(42)
    assert deliver(client, server) == [mux.PingReceived(42)]  # answered, and reported
    assert deliver(server, client) == [mux.PongReceived(42)]


def test_stream_limit_refuses_with_reset() -> None:
    client, server = pair()
    opened = [client.open_stream() for _ in range(5)]
    events = deliver(client, server)
    assert [e for e in events if isinstance(e, mux.StreamOpened)] == [
        mux.StreamOpened(i) for i in opened[:4]
    ]
    assert deliver(server, client) == [mux.StreamReset(opened[4])]


def test_close_reaches_the_peer() -> None:
    client, server = pair()
    client.open_stream()
    client.close(mux.CloseCode.GOING_AWAY)
    assert deliver(client, server)[-1] == mux.ConnectionClosed(mux.CloseCode.GOING_AWAY)
    assert server.closed


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (mux.HEADER.pack(mux.FrameType.DATA, 0, 1, 2048) + b"x" * 2048, "exceeds the limit"),
        (mux.HEADER.pack(9, 0, 1, 0), "9 is not a valid FrameType"),
        (
            mux.HEADER.pack(mux.FrameType.DATA, mux.Flag.SYN, 2, 1) + b"x",
            "cannot be opened by the peer",
        ),
        (mux.HEADER.pack(mux.FrameType.DATA, 0, 0, 1) + b"x", "on stream 0"),
    ],
)
def test_protocol_violations_close_the_connection(frame: bytes, problem: str) -> None:
    server = mux.MuxConnection(False, LIMITS)
    with pytest.raises(ProtocolViolation, match=problem):
        server.receive_data(frame)
    assert server.closed
    assert server.data_to_send().startswith(
        mux.HEADER.pack(mux.FrameType.GO_AWAY, 0, 0, mux.CloseCode.PROTOCOL_ERROR)
    )


def test_window_overrun_is_a_violation() -> None:
    server = mux.MuxConnection(False, LIMITS)
    opening = mux.HEADER.pack(mux.FrameType.WINDOW_UPDATE, mux.Flag.SYN, 1, 0)
    chunk = mux.HEADER.pack(mux.FrameType.DATA, 0, 1, 1024) + b"x" * 1024
    server.receive_data(opening + chunk * 4)
    with pytest.raises(ProtocolViolation, match="overran the flow-control window"):
        server.receive_data(chunk)


@given(
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
    st.binary(max_size=3000),
)
def test_chunking_does_not_change_events(cuts: list[int], payload: bytes) -> None:
    client, server = pair()
    stream = client.open_stream()
    client.send_data(stream, payload)
    client.end_stream(stream)
    wire = client.data_to_send()
    whole = mux.MuxConnection(False, LIMITS).receive_data(wire)
    pieces: list[mux.Event] = []
    position = 0
    for cut in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        pieces += server.receive_data(wire[position : position + cut])
        position += cut
    pieces += server.receive_data(wire[position:])
    received = b"".join(e.data for e in pieces if isinstance(e, mux.DataReceived))
    assert received == payload
    assert [type(e) for e in pieces if not isinstance(e, mux.DataReceived)] == [
        type(e) for e in whole if not isinstance(e, mux.DataReceived)
    ]


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise_anything_else(garbage: bytes) -> None:
    """A fuzz target for the parser of untrusted bytes: only ProtocolViolation may escape."""
    server = mux.MuxConnection(False, LIMITS)
    try:
        server.receive_data(garbage)
    except ProtocolViolation:
        assert server.closed
