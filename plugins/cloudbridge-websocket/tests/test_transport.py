"""The WebSocket transport on real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from cloudbridge_core.errors import TlsVerificationFailed
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_core.testing.tls import loopback_tls
from cloudbridge_core.tlsutil import client_context, generate_ca
from cloudbridge_websocket.hooks import SETTINGS_SCHEMA
from cloudbridge_websocket.transport import WebSocketTransport
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.timeout(60)
SETTINGS = plugin_settings(SETTINGS_SCHEMA)


def test_discovered_as_a_transport() -> None:
    [record] = [r for r in load_plugins().records if r.name == "websocket"]
    assert record.status == "active"
    assert record.providers == {"transport": ["websocket"]}


def test_streams_round_trip_with_integrity() -> None:
    async def main() -> None:
        server_tls, client_tls = loopback_tls()
        transport = WebSocketTransport(SETTINGS)
        listener = await transport.serve(Endpoint("127.0.0.1", 0, server_tls), echo_streams)
        session = await transport.connect(Endpoint("127.0.0.1", listener.port, client_tls))

        async def round_trip(size: int) -> None:
            payload = os.urandom(size)
            stream = await session.open_stream()
            await stream.write(payload)
            await stream.close_write()
            assert (
                hashlib.sha256(await read_all(stream)).digest() == hashlib.sha256(payload).digest()
            )

        await asyncio.gather(round_trip(8 << 20), *(round_trip(1000 + i) for i in range(20)))
        await session.aclose()
        await listener.aclose()

    asyncio.run(main())


def test_untrusted_certificate_and_wrong_subprotocol() -> None:
    async def main() -> None:
        server_tls, client_tls = loopback_tls()
        transport = WebSocketTransport(SETTINGS)
        listener = await transport.serve(Endpoint("127.0.0.1", 0, server_tls), echo_streams)
        stranger = client_context(generate_ca("someone else").certificate)
        with pytest.raises(TlsVerificationFailed):
            await transport.connect(Endpoint("127.0.0.1", listener.port, stranger))
        with pytest.raises(InvalidStatus, match="400"):  # no cloudbridge.v1 subprotocol offered
            await connect(f"wss://127.0.0.1:{listener.port}/cloudbridge", ssl=client_tls)
        await listener.aclose()

    asyncio.run(main())
