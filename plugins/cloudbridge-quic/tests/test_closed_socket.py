"""A QUIC session sends nothing once its socket is closed: asyncio would report each send
(``socket.send() raised exception.``, or an exception in the timer's callback once the
transport is gone) and the session's timer would keep firing for nothing (issue 18)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import pytest
from cloudbridge_core.errors import StreamAborted
from cloudbridge_core.testing.conformance import TransportKit
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams
from cloudbridge_quic.hooks import SETTINGS_SCHEMA
from cloudbridge_quic.transport import QuicTransport

pytestmark = pytest.mark.timeout(30)
SETTINGS = plugin_settings(SETTINGS_SCHEMA)
KIT = TransportKit(lambda: QuicTransport(SETTINGS))
#: longer than the closing period of a loopback connection (3 probe timeouts)
QUIET_PERIOD = 1.5


def _collect_loop_errors(reported: list[dict[str, Any]]) -> None:
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))


def test_closed_client_session_sends_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        _collect_loop_errors(reported)
        listener = await QuicTransport(SETTINGS).serve(KIT.server_endpoint(), echo_streams)
        try:
            session = await QuicTransport(SETTINGS).connect(KIT.client_endpoint(listener.port))
            stream = await session.open_stream()
            await stream.write(b"hello")
            await session.aclose()
            await asyncio.sleep(QUIET_PERIOD)  # waits for what must not happen
            assert session._timer is None, "the closed session's timer is still armed"
        finally:
            await listener.aclose()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(main())
    assert not reported, [context.get("message") for context in reported]
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_sessions_of_a_closed_listener_send_nothing(caplog: pytest.LogCaptureFixture) -> None:
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        _collect_loop_errors(reported)
        listener = await QuicTransport(SETTINGS).serve(KIT.server_endpoint(), echo_streams)
        session = await QuicTransport(SETTINGS).connect(KIT.client_endpoint(listener.port))
        try:
            stream = await session.open_stream()
            await stream.write(b"hello")
            await listener.aclose()
            await asyncio.sleep(QUIET_PERIOD)  # waits for what must not happen
        finally:
            await session.aclose()
        await asyncio.sleep(QUIET_PERIOD)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(main())
    assert not reported, [context.get("message") for context in reported]
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_connect_cancelled_mid_handshake_sends_nothing_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A race another transport won cancels the QUIC connect during its handshake: the
    handshake's retransmission timer must not send on the closed socket."""
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        _collect_loop_errors(reported)
        with socket.socket(type=socket.SOCK_DGRAM) as silent:  # takes datagrams, never answers
            silent.bind((KIT.host, 0))
            silent.setblocking(False)
            endpoint = KIT.client_endpoint(silent.getsockname()[1], connect_timeout=30)
            connecting = asyncio.create_task(QuicTransport(SETTINGS).connect(endpoint))
            await asyncio.get_running_loop().sock_recv(silent, 65536)  # the first Initial
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await asyncio.sleep(QUIET_PERIOD)  # past the first retransmissions

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(main())
    assert not reported, [context.get("message") for context in reported]
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_stream_aioquic_reset_on_its_own_raises_stream_aborted() -> None:
    """Map at the boundary: a stream whose sending side aioquic already reset (the peer's
    STOP_SENDING, handled inside aioquic) fails writes with StreamAborted, never with
    aioquic's ``RuntimeError: Cannot send data after the stream was reset``."""

    async def main() -> None:
        listener = await QuicTransport(SETTINGS).serve(KIT.server_endpoint(), echo_streams)
        session = await QuicTransport(SETTINGS).connect(KIT.client_endpoint(listener.port))
        try:
            stream = await session.open_stream()
            await stream.write(b"hello")
            session._quic.reset_stream(stream.stream_id, 0)  # behind the stream's back
            with pytest.raises(StreamAborted):
                await stream.write(b"more")
            with pytest.raises(StreamAborted):
                await stream.read()
            await stream.close_write()  # the stream has failed: nothing to do, no error
            await stream.reset()
        finally:
            await session.aclose()
            await listener.aclose()

    asyncio.run(main())
