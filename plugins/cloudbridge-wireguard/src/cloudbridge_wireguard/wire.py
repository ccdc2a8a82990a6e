"""What the overlay checks without touching the system: interface names, keys, and how a
WireGuard message looks on the wire (sans-IO)."""

from __future__ import annotations

import base64
import binascii
import re

from cloudbridge_core.api import OverlayFailed

#: Linux's IFNAMSIZ less the terminating NUL
MAX_NAME_LENGTH = 15
#: what ``overlay.interface`` allows; the name also makes the UAPI socket's file name and
#: the nftables table's name, so nothing that could leave a directory or need quoting
NAME = re.compile(r"[A-Za-z0-9_.-]+")
KEY_BYTES = 32
#: the smallest WireGuard message: a transport-data header with an empty (keepalive)
#: payload and its 16-byte tag
MIN_MESSAGE_BYTES = 32
#: message types 1..4 (handshake initiation, response, cookie reply, transport data),
#: each followed by three reserved zero bytes: the first 32 bits of every message
MESSAGE_HEADS = tuple(t << 24 for t in range(1, 5))


def check_interface_name(name: str) -> str:
    """``name`` if Linux and this plugin accept it as an interface name.

    Raises :class:`OverlayFailed` otherwise."""
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_NAME_LENGTH
        or not NAME.fullmatch(name)
        or name in (".", "..")
    ):
        raise OverlayFailed(
            f"invalid overlay interface name {name!r}: use 1 to {MAX_NAME_LENGTH} of "
            "A-Z a-z 0-9 _ . - (set overlay.interface)"
        )
    return name


def decode_key(value: str, what: str) -> bytes:
    """The 32 bytes of a base64 X25519 key. ``what`` names the key in the error, which
    never quotes the value (it may be a private key)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise OverlayFailed(f"{what} is not a WireGuard key (32 bytes in base64)")
    return raw


def is_wireguard_message(datagram: bytes | bytearray | memoryview) -> bool:
    """Whether ``datagram`` looks like a WireGuard message: type 1..4, three zero bytes,
    and at least :data:`MIN_MESSAGE_BYTES`. QUIC packets never do (their first byte has
    the 0x40 bit set), nor does STUN (its second byte is never zero for a real method).
    The fast path's nftables rule matches the same pattern."""
    return (
        len(datagram) >= MIN_MESSAGE_BYTES
        and 1 <= datagram[0] <= 4
        and datagram[1] == 0
        and datagram[2] == 0
        and datagram[3] == 0
    )
