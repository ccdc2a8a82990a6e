"""A bare HTTP/2 peer for black-box tests of the gRPC transport: it writes frames a hostile
client would (a PING flood, a call opened late and left silent), which grpc's own client
never sends, and reads what the relay answers, frame by frame."""

from __future__ import annotations

import asyncio
import enum
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: GOAWAY's error code for a peer that misbehaves (RFC 9113, 7): grpc's "too_many_pings"
ENHANCE_YOUR_CALM = 0xB
END_HEADERS = 0x4
ACK = 0x1


class Frame(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8


def frame(kind: Frame, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    head = struct.pack("!I", len(payload))[1:] + struct.pack("!BBI", kind, flags, stream_id)
    return head + payload


def opening() -> bytes:
    """The client's preface and an empty SETTINGS frame."""
    return PREFACE + frame(Frame.SETTINGS, 0, 0)


def ping(number: int) -> bytes:
    return frame(Frame.PING, 0, 0, struct.pack("!Q", number))


def call(stream_id: int, path: str, metadata: dict[str, str]) -> bytes:
    """HEADERS opening a gRPC call (HPACK literals, no Huffman, no dynamic table)."""
    fields = {
        ":method": "POST",
        ":scheme": "https",
        ":path": path,
        ":authority": "relay",
        "content-type": "application/grpc",
        "te": "trailers",
        **metadata,
    }
    block = b"".join(b"\0" + _string(name) + _string(value) for name, value in fields.items())
    return frame(Frame.HEADERS, END_HEADERS, stream_id, block)


def _string(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 127, "longer strings need HPACK's multi-byte lengths"
    return bytes([len(data)]) + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[Frame | int, int, int, bytes]:
    """The next frame: its type (a :class:`Frame` when known), flags, stream and payload."""
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    kind, flags, stream_id = struct.unpack("!BBI", head[3:])
    payload = await reader.readexactly(length)
    known = kind in Frame._value2member_map_
    return (Frame(kind) if known else kind), flags, stream_id & 0x7FFFFFFF, payload


async def goaway(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read until the peer's GOAWAY: its error code and debug data."""
    while True:
        kind, _, _, payload = await read_frame(reader)
        if kind is Frame.GOAWAY:
            code = struct.unpack("!I", payload[4:8])[0]
            return code, payload[8:]
