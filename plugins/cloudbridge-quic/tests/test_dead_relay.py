"""A QUIC client learns quickly that its relay is gone (issue 16), on loopback: the ICMP
port unreachable its connected socket hears, and the relay's stateless resets, with the
limits on both. A relay killed and restarted as a process: tests/test_quic_dead_relay.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import AsyncIterator

import pytest
from cloudbridge_core.api import QuicSession, ServerUnavailable, StatelessResets, TransportClosed
from cloudbridge_core.quic.reset import TOKEN_SIZE
from cloudbridge_core.quic.session import REFUSAL_SILENCE
from cloudbridge_core.testing.conformance import TransportKit
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_quic.hooks import SETTINGS_SCHEMA
from cloudbridge_quic.transport import QuicListener, QuicTransport

pytestmark = pytest.mark.timeout(60)
SETTINGS = plugin_settings(SETTINGS_SCHEMA)
KIT = TransportKit(lambda: QuicTransport(SETTINGS))
KEY = os.urandom(32)


async def listen() -> QuicListener:
    endpoint = dataclasses.replace(KIT.server_endpoint(), reset_key=KEY)
    return await QuicTransport(SETTINGS).serve(endpoint, echo_streams)


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


def from_the_relay(listener: QuicListener, session: QuicSession, datagram: bytes) -> None:
    """Send ``datagram`` to the client from the relay's own address and port, the only
    ones its connected socket takes datagrams from."""
    assert listener.server is not None
    assert listener.server._transport is not None
    assert session._transport is not None
    port = session._transport.get_extra_info("sockname")[1]
    listener.server._transport.sendto(datagram, ("127.0.0.1", port))


def closed_udp_port() -> int:
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_relays_tokens_derive_from_its_key_for_every_connection_id() -> None:
    """The first connection ID's token (transport parameters) and those issued later
    (NEW_CONNECTION_ID): a restarted relay with the same key computes each of them."""

    async def main() -> None:
        async with relay_and_client() as (_, session):
            assert await echo(session, b"settled") == b"settled"
            quic = session._quic
            while not quic._peer_cid_available:  # noqa: ASYNC110 - aioquic has no event for it
                await asyncio.sleep(0.01)
            issued = [quic._peer_cid, *quic._peer_cid_available]
            tokens = StatelessResets(KEY)
            assert [c.stateless_reset_token for c in issued] == [
                tokens.token(c.cid) for c in issued
            ]

    asyncio.run(main())


def test_a_reset_with_the_token_ends_the_session_and_random_bytes_do_not() -> None:
    async def main() -> None:
        async with relay_and_client() as (listener, session):
            token = StatelessResets(KEY).token(session._quic._peer_cid.cid)
            forged = b"\x40" + os.urandom(42 - TOKEN_SIZE) + os.urandom(TOKEN_SIZE)
            from_the_relay(listener, session, forged)
            # sent after the forgery on the same path: the forgery has arrived when it returns
            assert await echo(session, b"still here") == b"still here"
            from_the_relay(listener, session, b"\x40" + os.urandom(42 - TOKEN_SIZE) + token)
            with pytest.raises(TransportClosed, match=r"relay restarted \(QUIC stateless reset\)"):
                await asyncio.wait_for(session.accept_stream(), 10)

    asyncio.run(main())


def test_a_refusal_counts_only_from_a_silent_relay_that_leaves_a_ping_unanswered() -> None:
    """Anyone on the path can forge an ICMP port unreachable: one arriving while datagrams
    still come from the relay leaves the session, and so does one after a silence when
    the relay answers the PING it makes the client send. Only an unanswered PING (a PTO
    without an answer, moved back here rather than waited for) lets one end it."""

    async def main() -> None:
        async with relay_and_client() as (_, session):
            refusal = ConnectionRefusedError(111, "Connection refused")
            assert await echo(session, b"talking") == b"talking"
            session.error_received(refusal)  # the echo has just been heard
            assert session._probed is None
            assert session._heard is not None
            session._heard -= REFUSAL_SILENCE  # silent since
            session.error_received(refusal)
            probed = session._probed
            assert probed is not None  # a PING, and the session goes on
            while session._heard < probed:  # noqa: ASYNC110 - the PING's ACK has no event
                await asyncio.sleep(0.01)
            session.error_received(refusal)
            assert not session.refused
            assert await echo(session, b"still here") == b"still here"

            session._heard -= REFUSAL_SILENCE
            session.error_received(refusal)
            assert session._probed is not None
            session._probed -= session._quic._loss.get_probe_timeout()
            session._heard = session._probed - REFUSAL_SILENCE  # the PING had no answer
            session.error_received(refusal)
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


def test_the_relay_resets_unknown_connections_but_never_a_tiny_datagram() -> None:
    async def main() -> None:
        listener = await listen()
        loop = asyncio.get_running_loop()
        with socket.socket(type=socket.SOCK_DGRAM) as stranger:
            stranger.connect(("127.0.0.1", listener.port))
            stranger.setblocking(False)
            tiny, unknown = os.urandom(8), os.urandom(8)
            # the smallest valid short-header packet, then one a byte longer
            await loop.sock_sendall(stranger, (b"\x40" + tiny).ljust(21, b"\0"))
            await loop.sock_sendall(stranger, (b"\x40" + unknown).ljust(22, b"\0"))
            answer = await asyncio.wait_for(loop.sock_recv(stranger, 2048), 10)
        # the first answer is the second datagram's: the tiny one got none
        assert len(answer) == 21
        assert answer[-TOKEN_SIZE:] == StatelessResets(KEY).token(unknown)
        await listener.aclose()

    asyncio.run(main())
