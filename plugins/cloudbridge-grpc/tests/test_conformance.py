"""The gRPC transport passes the transport conformance kit."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.testing.conformance import TransportKit, run_check
from cloudbridge_core.testing.fixtures import Check, conformance_check  # noqa: F401 - fixture
from cloudbridge_grpc._generated.tunnel_pb2 import Chunk
from cloudbridge_grpc.transport import GrpcTransport

LIMIT = 65536


async def oversized_message(endpoint: Endpoint) -> None:
    """A message one byte over the relay's limit: refused with RESOURCE_EXHAUSTED."""
    # a client allowed to send more than the relay accepts
    session = await GrpcTransport({"max_message_bytes": LIMIT * 4}).connect(endpoint)
    call = session._open_call(metadata=session._metadata)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.write(Chunk(data=b"x" * (LIMIT + 1)))
        await call.read()
    assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await session.aclose()


@pytest.mark.timeout(90)
def test_conformance(conformance_check: Check) -> None:  # noqa: F811 - the fixture
    kit = TransportKit(lambda: GrpcTransport({"max_message_bytes": LIMIT}), oversized_message)
    run_check(conformance_check, kit)
