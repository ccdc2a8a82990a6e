"""The wire codec: round trips, every decoder fuzzed, limits enforced, secrets unquoted."""

from __future__ import annotations

import json

import pytest
from cloudbridge_core.errors import ProtocolViolation
from cloudbridge_core.protocol import messages as m
from hypothesis import given, settings
from hypothesis import strategies as st

EXAMPLES: list[m.Message] = [
    m.Hello(token="eyJ.a.b", client_version="0.1.0", capabilities=("mux", "tunnel")),
    m.Welcome(
        session_id="s3ss10n-id", tenant_id="acme", heartbeat_interval_seconds=30, server_time=1.5e9
    ),
    m.Welcome(
        session_id="s3ss10n-id",
        tenant_id="acme",
        heartbeat_interval_seconds=30,
        server_time=1.5e9,
        capabilities=(m.MESH_REPORT, m.DEGRADED),
        degraded=(m.CLUSTER_BACKEND,),
    ),
    m.ErrorMessage(code="invalid_token", message="token signature is invalid"),
    m.Ping(nonce=7),
    m.Pong(nonce=7),
    m.Open(target="127.0.0.1:9000"),
    m.Open(target="[::1]:22"),
    m.Accept(),
    m.Reject(code="egress_denied", message="169.254.169.254 is denied"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(message: m.Message) -> None:
    reader = m.MessageReader()
    reader.feed(m.encode(message) + b"raw bytes after")
    assert reader.next_message() == message
    assert reader.take_buffered() == b"raw bytes after"
    assert reader.next_message() is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "invalid message"),
        (json.dumps({"type": "open", "target": "no-port"}).encode(), "field 'target'"),
        (
            json.dumps(
                {
                    "type": "hello",
                    "version": 2,
                    "token": "t",
                    "client_version": "x",
                    "capabilities": [],
                }
            ).encode(),
            "field 'version'",
        ),
        (json.dumps({"type": "accept", "extra": 1}).encode(), "invalid accept"),
        (json.dumps({"type": "launch"}).encode(), "invalid message"),
    ],
)
def test_invalid_bodies_are_protocol_violations(body: bytes, problem: str) -> None:
    reader = m.MessageReader()
    reader.feed(m.LENGTH.pack(len(body)) + body)
    with pytest.raises(ProtocolViolation, match=problem):
        reader.next_message()


def test_oversized_messages_are_refused_before_buffering() -> None:
    reader = m.MessageReader()
    reader.feed(m.LENGTH.pack(m.MAX_MESSAGE_SIZE + 1))
    with pytest.raises(ProtocolViolation, match="exceeds the limit"):
        reader.next_message()
    with pytest.raises(ValueError, match="exceeds"):
        m.encode(m.Hello(token="x" * m.MAX_RELAY_MESSAGE_SIZE, client_version="0"))


def test_errors_never_quote_the_token() -> None:
    body = json.dumps(
        {
            "type": "hello",
            "version": 1,
            "token": "",
            "client_version": "x" * 100,
            "capabilities": ["SECRET-CAP"],
        }
    )
    reader = m.MessageReader()
    reader.feed(m.LENGTH.pack(len(body)) + body.encode())
    with pytest.raises(ProtocolViolation) as caught:
        reader.next_message()
    assert "SECRET" not in str(caught.value)
    assert "x" * 100 not in str(caught.value)


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_fuzz_reader_only_raises_protocol_violations(garbage: bytes) -> None:
    reader = m.MessageReader()
    reader.feed(garbage)
    try:
        while reader.next_message() is not None:
            pass
    except ProtocolViolation:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(
    st.dictionaries(
        st.sampled_from(["type", "token", "target", "nonce", "code", "message", "version"])
        | st.text(max_size=8),
        json_values,
        max_size=6,
    )
)
def test_fuzz_decoder_with_json_shaped_input(body: dict[str, object]) -> None:
    try:
        decoded = m.decode_body(json.dumps(body).encode())
    except ProtocolViolation:
        return
    assert m.decode_body(m.encode(decoded)[m.LENGTH.size :]) == decoded
