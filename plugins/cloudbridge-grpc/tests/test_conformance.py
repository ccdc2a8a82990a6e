"""The gRPC transport passes the transport conformance kit, at the smallest and default limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator

import grpc
import pytest
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.testing.conformance import TransportKit, run_check
from cloudbridge_core.testing.fixtures import Check, conformance_check  # noqa: F401 - fixture
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_grpc._generated.tunnel_pb2 import Chunk, Control
from cloudbridge_grpc.hooks import SETTINGS_SCHEMA
from cloudbridge_grpc.sessions import SESSION_HEADER, SESSION_METHOD, STREAM_METHOD
from cloudbridge_grpc.transport import GrpcTransport

SMALLEST = SETTINGS_SCHEMA["properties"]["max_message_bytes"]["minimum"]
DEFAULT = SETTINGS_SCHEMA["properties"]["max_message_bytes"]["default"]


async def oversized_chunk(limit: int, endpoint: Endpoint) -> None:
    """A raw gRPC client joins a session, then sends one ``Chunk`` over the relay's limit."""
    assert endpoint.material is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=endpoint.material.ca)
    unlimited = [("grpc.max_send_message_length", -1)]
    target = f"{endpoint.host}:{endpoint.port}"
    async with grpc.aio.secure_channel(target, credentials, options=unlimited) as channel:
        metadata = ((SESSION_HEADER, "a-misbehaving-client"),)
        control = channel.stream_stream(
            SESSION_METHOD, Control.SerializeToString, Control.FromString
        )(metadata=metadata)
        assert await control.read() == Control()  # the session's acknowledgement
        call = channel.stream_stream(STREAM_METHOD, Chunk.SerializeToString, Chunk.FromString)(
            metadata=metadata
        )
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(Chunk(data=b"x" * (limit + 1)))
            await call.read()
        assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def one_loop() -> Iterator[asyncio.Runner]:
    """Every check on one event loop, as in a relay's or a client's process: grpc.aio
    completes a call's last operations on the loop that started it, after the call."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.mark.timeout(90)
@pytest.mark.parametrize("limit", [SMALLEST, DEFAULT], ids=["smallest_limit", "default_limit"])
def test_conformance(
    conformance_check: Check,  # noqa: F811 - the fixture
    limit: int,
    one_loop: asyncio.Runner,
) -> None:
    kit = TransportKit(
        lambda: GrpcTransport(plugin_settings(SETTINGS_SCHEMA, max_message_bytes=limit)),
        functools.partial(oversized_chunk, limit),
    )
    run_check(conformance_check, kit, runner=one_loop)
