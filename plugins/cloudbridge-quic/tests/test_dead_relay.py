"""A QUIC client learns quickly that its relay is gone (issue 16), on loopback: the ICMP
port unreachable its connected socket hears, and the limit on it. A relay killed as a
process: tests/test_quic_dead_relay.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from cloudbridge_core.api import QuicSession, ServerUnavailable, TransportClosed
from cloudbridge_core.quic.session import REFUSAL_SILENCE
from cloudbridge_core.testing.conformance import TransportKit
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_quic.hooks import SETTINGS_SCHEMA
from cloudbridge_quic.transport import QuicListener, QuicTransport

pytestmark = pytest.mark.timeout(60)
SETTINGS = plugin_settings(SETTINGS_SCHEMA)
KIT = TransportKit(lambda: QuicTransport(SETTINGS))


async def listen() -> QuicListener:
    return await QuicTransport(SETTINGS).serve(KIT.server_endpoint(), echo_streams)


@contextlib.asynccontextmanager
async def relay_and_client() -> AsyncIterator[tuple[QuicListener, QuicSession]]:
    listener = await listen()
    try:
        session = await QuicTransport(SETTINGS).connect(KIT.client_endpoint(listener.port))
        try:
            yield listener, session
        finally:
            await session.aclose()
    finally:
        await listener.aclose()


async def echo(session: QuicSession, payload: bytes) -> bytes:
    stream = await session.open_stream()
    await stream.write(payload)
    await stream.close_write()
    return await asyncio.wait_for(read_all(stream), 10)


def closed_udp_port() -> int:
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_refusal_while_the_relay_talks_is_ignored_and_after_a_silence_ends_the_session() -> None:
    """Anyone on the path can forge an ICMP port unreachable: one arriving while datagrams
    still come from the relay (here an echo's, just received) leaves the session."""

    async def main() -> None:
        async with relay_and_client() as (_, session):
            assert await echo(session, b"talking") == b"talking"
            session.error_received(ConnectionRefusedError(111, "Connection refused"))
            assert not session.refused
            assert await echo(session, b"still here") == b"still here"
            # the same refusal once the relay has been silent for REFUSAL_SILENCE
            assert session._heard is not None
            session._heard -= REFUSAL_SILENCE
            session.error_received(ConnectionRefusedError(111, "Connection refused"))
            assert session.refused
            with pytest.raises(TransportClosed, match=r"port is closed \(ICMP port unreachable\)"):
                await session.accept_stream()

    asyncio.run(main())


def test_a_handshake_with_a_closed_port_fails_at_once_naming_it() -> None:
    """Not after connect_timeout: the ICMP port unreachable answers the first Initial."""

    async def main() -> None:
        port = closed_udp_port()
        endpoint = KIT.client_endpoint(port, connect_timeout=30)
        with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port} refused the QUIC"):
            await QuicTransport(SETTINGS).connect(endpoint)

    asyncio.run(main())
