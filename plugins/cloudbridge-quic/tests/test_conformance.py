"""The QUIC transport passes the transport conformance kit."""

from __future__ import annotations

import asyncio

import pytest
from cloudbridge_core.errors import TransportClosed
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.testing.conformance import TransportKit, run_check
from cloudbridge_core.testing.fixtures import Check, conformance_check  # noqa: F401 - fixture
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_quic.hooks import SETTINGS_SCHEMA
from cloudbridge_quic.transport import QuicTransport

SETTINGS = plugin_settings(SETTINGS_SCHEMA)


async def oversized_datagram_frame(endpoint: Endpoint) -> None:
    """A DATAGRAM frame over the relay's limit (2,048 bytes): a protocol violation."""
    session = await QuicTransport(SETTINGS).connect(endpoint)
    session._quic._remote_max_datagram_frame_size = 65536  # lie about what the relay accepts
    session._quic.send_datagram_frame(b"x" * 4000)
    session.transmit()
    try:
        await asyncio.wait_for(session.accept_stream(), 10)
    except TransportClosed:
        pass
    finally:
        await session.aclose()


@pytest.mark.timeout(90)
def test_conformance(conformance_check: Check) -> None:  # noqa: F811 - the fixture
    kit = TransportKit(lambda: QuicTransport(SETTINGS), oversized_datagram_frame)
    run_check(conformance_check, kit)
