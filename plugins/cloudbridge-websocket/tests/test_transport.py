"""The WebSocket transport on real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from cloudbridge_core.errors import TlsVerificationFailed, TransportClosed
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.protocol.mux import MuxConnection
from cloudbridge_core.providers import Endpoint, Session
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_core.testing.tls import loopback_tls
from cloudbridge_core.tlsutil import client_context, generate_ca
from cloudbridge_core.transports.mux_session import MuxSession
from cloudbridge_websocket.hooks import SETTINGS_SCHEMA
from cloudbridge_websocket.transport import WebSocketTransport
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

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


def test_fragmented_messages_reach_the_session_whole_and_a_text_message_ends_it() -> None:
    """The connection hands messages to the session itself (not through ``recv``): a
    message in fragments arrives whole, in order with the others; text is refused."""

    async def main() -> None:
        server_tls, client_tls = loopback_tls()
        transport = WebSocketTransport(SETTINGS)
        sessions: asyncio.Queue[Session] = asyncio.Queue()

        async def handler(session: Session) -> None:
            assert isinstance(session, MuxSession)
            sessions.put_nowait(session)
            await session.wait_closed()

        listener = await transport.serve(Endpoint("127.0.0.1", 0, server_tls), handler)
        dialer = MuxConnection(is_dialer=True)
        stream_id = dialer.open_stream()
        dialer.send_data(stream_id, b"in three fragments")
        frames = bytes(dialer.data_to_send())
        async with connect(
            f"wss://127.0.0.1:{listener.port}/cloudbridge",
            ssl=client_tls,
            subprotocols=[Subprotocol("cloudbridge.v1")],
        ) as raw:
            await raw.send([frames[:5], frames[5:20], frames[20:]])
            dialer.send_data(stream_id, b", then one")
            await raw.send(bytes(dialer.data_to_send()))
            session = await sessions.get()
            stream = await session.accept_stream()
            expected = b"in three fragments, then one"
            received = b""
            while len(received) < len(expected):
                received += await stream.read()
            assert received == expected
            await raw.send("text")
            with pytest.raises(TransportClosed):
                await session.accept_stream()
        await listener.aclose()

    asyncio.run(main())
