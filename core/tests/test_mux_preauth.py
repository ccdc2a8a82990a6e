"""The multiplexer's pre-auth budget, sans-IO: bytes in, events out."""

from __future__ import annotations

import pytest
from cloudbridge_core.errors import ProtocolViolation
from cloudbridge_core.protocol.mux import (
    HEADER,
    DataReceived,
    Flag,
    FrameType,
    MuxConnection,
    MuxLimits,
    StreamOpened,
)

LIMITS = MuxLimits(initial_window=256 * 1024, preauth_window=32 * 1024)


def _frame(kind: FrameType, flags: Flag, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload) if kind is FrameType.DATA else 0
    return HEADER.pack(kind, flags, stream_id, length) + payload


def _open(stream_id: int) -> bytes:
    return _frame(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id)


def _data(stream_id: int, size: int) -> bytes:
    return _frame(FrameType.DATA, Flag.NONE, stream_id, b"x" * size)


def test_a_stranger_gets_one_stream() -> None:
    server = MuxConnection(is_dialer=False, limits=LIMITS, preauth=True)
    assert server.receive_data(_open(1)) == [StreamOpened(1)]
    with pytest.raises(ProtocolViolation, match="second stream"):
        server.receive_data(_open(3))
    assert server.closed


def test_a_stranger_may_send_its_hello_and_no_more() -> None:
    server = MuxConnection(is_dialer=False, limits=LIMITS, preauth=True)
    server.receive_data(_open(1))
    assert server.receive_data(_data(1, 16 * 1024)) == [DataReceived(1, b"x" * 16 * 1024)]
    with pytest.raises(ProtocolViolation, match="overran"):
        server.receive_data(_data(1, 16 * 1024 + 1))


def test_a_frame_over_the_budget_is_refused_at_its_header() -> None:
    server = MuxConnection(is_dialer=False, limits=LIMITS, preauth=True)
    server.receive_data(_open(1))
    header_only = HEADER.pack(FrameType.DATA, Flag.NONE, 1, 64 * 1024)
    with pytest.raises(ProtocolViolation, match="exceeds the limit of 32768"):
        server.receive_data(header_only)


def test_once_authenticated_the_full_window_and_more_streams() -> None:
    server = MuxConnection(is_dialer=False, limits=LIMITS, preauth=True)
    server.receive_data(_open(1) + _data(1, 1000))
    server.authenticated()
    assert server.data_to_send() == b""  # the peer already assumed the full window
    rest = 256 * 1024 - 1000  # the full window, in frames of at most 64 KiB
    frames = [_data(1, min(64 * 1024, rest - start)) for start in range(0, rest, 64 * 1024)]
    events = server.receive_data(b"".join(frames) + _open(3))
    assert events[-1] == StreamOpened(3)
    with pytest.raises(ProtocolViolation, match="overran"):
        server.receive_data(_data(1, 1))


def test_a_dialer_and_a_server_without_preauth_are_unchanged() -> None:
    server = MuxConnection(is_dialer=False, limits=LIMITS)
    assert server.receive_data(_open(1) + _open(3)) == [StreamOpened(1), StreamOpened(3)]
    server.receive_data(_data(1, 64 * 1024))
