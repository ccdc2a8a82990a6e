"""The WebSocket transport passes the transport conformance kit."""

from __future__ import annotations

import contextlib

import pytest
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.testing.conformance import TransportKit, oversized_mux_frame, run_check
from cloudbridge_core.testing.fixtures import Check, conformance_check  # noqa: F401 - fixture
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_websocket.hooks import SETTINGS_SCHEMA
from cloudbridge_websocket.transport import SUBPROTOCOL, WebSocketTransport
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def oversized_frame_in_a_message(endpoint: Endpoint) -> None:
    uri = f"wss://{endpoint.host}:{endpoint.port}/cloudbridge"
    async with connect(uri, ssl=endpoint.tls, subprotocols=[SUBPROTOCOL]) as websocket:  # type: ignore[list-item]
        await websocket.send(oversized_mux_frame())
        with contextlib.suppress(ConnectionClosed):
            await websocket.recv()  # the server hangs up


@pytest.mark.timeout(90)
def test_conformance(conformance_check: Check) -> None:  # noqa: F811 - the fixture
    kit = TransportKit(
        lambda: WebSocketTransport(plugin_settings(SETTINGS_SCHEMA)),
        oversized_frame_in_a_message,
    )
    run_check(conformance_check, kit)
