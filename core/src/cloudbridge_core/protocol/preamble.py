"""The preamble of a peer's raw connection to the relay's TLS port, sans-IO.

A peer holding a splice ticket (``peer_ticket`` → ``ticket``) opens a plain TCP connection
to the port the ticket names and sends :data:`MAGIC` then the ticket's bytes, nothing
else, before its end-to-end TLS. The relay's TLS listener tells the two kinds of
connection apart by the first byte: a TLS record starts with its content type (a
ClientHello's handshake record, 0x16, or an alert, 0x15), and :data:`MAGIC` starts with
none of them.
"""

from __future__ import annotations

import base64

#: what starts a raw connection: not a TLS content type (0x14-0x18), not printable ASCII
#: (so no HTTP method or proxy greeting either); the last byte is the format's version
MAGIC = b"\x00CBtkt\x00\x01"
#: a ticket's random bytes (256 bits: guessing one is hopeless within its lifetime)
TICKET_SIZE = 32
PREAMBLE_SIZE = len(MAGIC) + TICKET_SIZE


def preamble(ticket: bytes) -> bytes:
    """What a peer sends first on its raw connection."""
    if len(ticket) != TICKET_SIZE:
        raise ValueError(f"a ticket has {TICKET_SIZE} bytes")
    return MAGIC + ticket


def may_be_preamble(first: bytes) -> bool:
    """Whether a connection whose first bytes are ``first`` (one at least) is a raw one
    rather than TLS: decided by the first byte alone, so a TLS client is never waited for."""
    return first[:1] == MAGIC[:1]


def ticket_of(data: bytes) -> bytes | None:
    """The ticket a complete preamble carries, or None when ``data`` is not one."""
    if len(data) != PREAMBLE_SIZE or not data.startswith(MAGIC):
        return None
    return data[len(MAGIC) :]


def ticket_text(ticket: bytes) -> str:
    """A ticket as the ``ticket`` message carries it (base64url, no padding)."""
    return base64.urlsafe_b64encode(ticket).rstrip(b"=").decode()


def ticket_bytes(text: str) -> bytes:
    """The bytes of a ticket the relay sent; raises ``ValueError`` for a malformed one."""
    ticket = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if len(ticket) != TICKET_SIZE:
        raise ValueError(f"a ticket has {TICKET_SIZE} bytes")
    return ticket
