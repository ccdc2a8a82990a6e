"""The frames of a relay-to-relay link (sans-IO): one DERP packet each, big-endian::

    length (4 bytes, of all that follows) | tenant id length (1) | tenant id (ASCII)
    | sender key (32) | target key (32) | payload (at most derp.MAX_PAYLOAD)

A frame whose length is out of bounds (checked from its header, before its body is
buffered: a security limit), whose tenant id is not one (``tenants.is_tenant_id``) or
anything else malformed is a ``ProtocolViolation``, and the link carrying it is closed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cloudbridge_core.errors import ProtocolViolation
from cloudbridge_core.protocol import derp
from cloudbridge_core.tenants import is_tenant_id

KEY_SIZE = derp.KEY_SIZE
MAX_PAYLOAD = derp.MAX_PAYLOAD
#: the longest tenant id (tenants.TENANT_ID_PATTERN)
MAX_TENANT_ID = 63
_HEADER = struct.Struct("!IB")


@dataclass(frozen=True, slots=True)
class LinkPacket:
    tenant_id: str
    sender_key: bytes
    target_key: bytes
    payload: bytes


def encode_packet(tenant_id: str, sender_key: bytes, target_key: bytes, payload: bytes) -> bytes:
    """One frame; raises ``ValueError`` for what the other end would refuse."""
    if not is_tenant_id(tenant_id):
        raise ValueError("not a tenant id")
    if len(sender_key) != KEY_SIZE or len(target_key) != KEY_SIZE:
        raise ValueError(f"a key has {KEY_SIZE} bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a payload has at most {MAX_PAYLOAD} bytes")
    tenant = tenant_id.encode("ascii")
    length = 1 + len(tenant) + 2 * KEY_SIZE + len(payload)
    return b"".join((_HEADER.pack(length, len(tenant)), tenant, sender_key, target_key, payload))


class PacketReader:
    """Splits a link's bytes into packets (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[LinkPacket]:
        """The packets ``data`` completes, in order (iterate them before feeding more).
        Raises ``ProtocolViolation`` at the first malformed frame, after the packets
        before it."""
        self._buffer += data
        return self._packets()

    def _packets(self) -> Iterator[LinkPacket]:
        buffer = self._buffer
        offset = 0
        try:
            while len(buffer) - offset >= _HEADER.size:
                length, tenant_size = _HEADER.unpack_from(buffer, offset)
                payload_size = length - 1 - tenant_size - 2 * KEY_SIZE
                # checked from the header, before the body is buffered (a security limit)
                if not (0 < tenant_size <= MAX_TENANT_ID and 0 <= payload_size <= MAX_PAYLOAD):
                    raise ProtocolViolation(
                        f"link frame of {length} bytes with a tenant id of {tenant_size} is invalid"
                    )
                end = offset + 4 + length
                if len(buffer) < end:
                    return
                keys = offset + _HEADER.size + tenant_size
                tenant_id = buffer[offset + _HEADER.size : keys].decode("ascii", "replace")
                if not is_tenant_id(tenant_id):
                    raise ProtocolViolation("link frame with an invalid tenant id")
                sender = bytes(buffer[keys : keys + KEY_SIZE])
                target = bytes(buffer[keys + KEY_SIZE : keys + 2 * KEY_SIZE])
                payload = bytes(buffer[keys + 2 * KEY_SIZE : end])
                offset = end
                yield LinkPacket(tenant_id, sender, target, payload)
        finally:  # what was read is dropped once, not frame by frame
            del buffer[:offset]
