"""Stateless resets, sans-IO: the tokens a relay's key gives, the resets it sends, their
sizes and their rate (issue 16)."""

from __future__ import annotations

import hashlib
import hmac

from cloudbridge_core.quic.reset import (
    RESET_RATE,
    RESET_SIZE,
    SMALLEST_RESET,
    TOKEN_SIZE,
    StatelessResets,
)
from hypothesis import given
from hypothesis import strategies as st

KEY = bytes(range(32))
CID = bytes.fromhex("0123456789abcdef")


def short_packet(size: int, cid: bytes = CID) -> bytes:
    return (b"\x40" + cid + bytes(size))[:size]


def test_a_token_is_the_hmac_of_the_connection_id_under_the_key() -> None:
    token = StatelessResets(KEY).token(CID)
    assert token == hmac.new(KEY, CID, hashlib.sha256).digest()[:16]
    # another process with the same key (a restarted relay) computes the same token
    assert StatelessResets(KEY).token(CID) == token
    assert StatelessResets(bytes(32)).token(CID) != token
    assert StatelessResets(KEY).token(CID[::-1]) != token


@given(st.integers(min_value=SMALLEST_RESET + 1, max_value=16384))
def test_a_reset_is_shorter_than_its_trigger_and_ends_in_the_token(size: int) -> None:
    reset = StatelessResets(KEY).answer(short_packet(size), CID, now=0.0)
    assert reset is not None
    assert SMALLEST_RESET <= len(reset) < size
    assert len(reset) == min(size - 1, RESET_SIZE)
    assert reset[0] & 0xC0 == 0x40  # a short header with its fixed bit
    assert reset[-TOKEN_SIZE:] == StatelessResets(KEY).token(CID)


def test_a_datagram_too_small_to_be_a_packet_is_never_answered() -> None:
    """A reset answering one of these would be under the smallest a reset can be; and
    since each answer is shorter than its trigger, two endpoints resetting each other
    (one forged with the other's address) stop when they get here."""
    resets = StatelessResets(KEY)
    for size in range(1, SMALLEST_RESET + 1):
        assert resets.answer(short_packet(size), CID, now=0.0) is None
    assert resets.answer(short_packet(SMALLEST_RESET + 1), CID, now=0.0) is not None


def test_resets_stay_within_the_rate() -> None:
    resets = StatelessResets(KEY)
    packet = short_packet(1200)

    def answered(count: int, now: float) -> int:
        return sum(resets.answer(packet, CID, now) is not None for _ in range(count))

    assert answered(10_000, now=100.0) == RESET_RATE  # a burst of one second's worth
    assert answered(10_000, now=100.5) == RESET_RATE / 2
    assert answered(10_000, now=100.5) == 0
    assert answered(10_000, now=1000.0) == RESET_RATE  # a quiet spell saves no more
