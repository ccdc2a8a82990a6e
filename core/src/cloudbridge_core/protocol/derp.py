"""DERP frames: packets between peers, forwarded by the relay on the streams peers hold.

In the spirit of Tailscale's DERP: each frame is ``type`` (1 byte), ``length`` (4 bytes,
big-endian, of what follows) and a 32-byte X25519 public key, then the payload. The relay
reads only the type and key; payloads are sealed end to end by the peers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cloudbridge_core.errors import ProtocolViolation

HEADER = struct.Struct("!BI")
KEY_SIZE = 32
#: largest payload forwarded: a QUIC datagram plus its seal, with room to spare
MAX_PAYLOAD = 65535
#: the ``open`` target that turns a stream into the session's DERP channel
TARGET = "derp"


class FrameType(enum.IntEnum):
    SEND_PACKET = 1  # client -> relay: key is the destination
    RECV_PACKET = 2  # relay -> client: key is the source
    PEER_GONE = 3  # relay -> client: the peer with this key has no DERP channel here
    RESTARTING = 4  # relay -> client: the relay is about to restart (key all zeros)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    key: bytes
    payload: bytes = b""


def encode(frame: Frame) -> bytes:
    if len(frame.key) != KEY_SIZE:
        raise ValueError(f"a DERP key has {KEY_SIZE} bytes, not {len(frame.key)}")
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"DERP payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(frame.type, KEY_SIZE + len(frame.payload)) + frame.key + frame.payload


class FrameReader:
    """Splits a byte stream into frames (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if length < KEY_SIZE or length > KEY_SIZE + MAX_PAYLOAD:
                raise ProtocolViolation(f"DERP frame length {length} is out of bounds")
            try:
                frame_type = FrameType(kind)
            except ValueError:
                raise ProtocolViolation(f"unknown DERP frame type {kind}") from None
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            frames.append(Frame(frame_type, body[:KEY_SIZE], body[KEY_SIZE:]))
        return frames
