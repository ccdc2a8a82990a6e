"""The raw connection's preamble (protocol/preamble.py): a TLS client is never taken for
a raw connection, and any bytes parse to a ticket only when they are exactly a preamble."""

from __future__ import annotations

import pytest
from cloudbridge_core.protocol.preamble import (
    MAGIC,
    PREAMBLE_SIZE,
    TICKET_SIZE,
    may_be_preamble,
    preamble,
    ticket_bytes,
    ticket_of,
    ticket_text,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize("content_type", range(0x14, 0x19))  # every TLS record type
def test_no_tls_record_is_taken_for_a_preamble(content_type: int) -> None:
    assert not may_be_preamble(bytes([content_type, 3, 1]))


@given(st.binary(min_size=TICKET_SIZE, max_size=TICKET_SIZE))
def test_a_ticket_goes_through_its_preamble_and_its_text(ticket: bytes) -> None:
    sent = preamble(ticket)
    assert len(sent) == PREAMBLE_SIZE
    assert may_be_preamble(sent[:1])
    assert ticket_of(sent) == ticket
    assert ticket_bytes(ticket_text(ticket)) == ticket


@given(st.binary(max_size=2 * PREAMBLE_SIZE))
def test_any_bytes_are_a_ticket_only_when_they_are_a_preamble(data: bytes) -> None:
    found = ticket_of(data)
    if found is not None:
        assert data == MAGIC + found
    assert ticket_of(MAGIC + data) == (data if len(data) == TICKET_SIZE else None)


@given(st.text(max_size=64))
def test_a_malformed_ticket_text_is_a_value_error(text: str) -> None:
    try:
        ticket = ticket_bytes(text)
    except ValueError:
        return
    assert len(ticket) == TICKET_SIZE
