"""The built-in TLS transport on real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cloudbridge_core.builtin import SETTINGS_SCHEMA
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import (
    ConfigError,
    ConnectionTimeout,
    ServerUnavailable,
    StreamAborted,
    TlsVerificationFailed,
    TransportClosed,
)
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import Endpoint, Session
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_core.testing.tls import loopback_tls
from cloudbridge_core.tlsutil import client_context, generate_ca
from cloudbridge_core.transports.mux_session import MuxSession
from cloudbridge_core.transports.tls import TlsListener, TlsTransport

pytestmark = pytest.mark.timeout(60)

Scenario = Callable[[MuxSession, TlsListener, asyncio.Queue[MuxSession]], Awaitable[None]]


async def idle(session: Session) -> None:
    assert isinstance(session, MuxSession)
    await session.wait_closed()


def run(
    scenario: Scenario,
    handler: Callable[[Session], Awaitable[None]] | None = None,
    limits: MuxLimits | None = None,
) -> None:
    async def main() -> None:
        server_tls, client_tls = loopback_tls()
        transport = TlsTransport(limits)
        accepted: asyncio.Queue[MuxSession] = asyncio.Queue()

        async def handle(session: Session) -> None:
            assert isinstance(session, MuxSession)
            accepted.put_nowait(session)
            await (handler or echo_streams)(session)

        listener = await transport.serve(Endpoint("127.0.0.1", 0, server_tls), handle)
        session = await transport.connect(Endpoint("127.0.0.1", listener.port, client_tls))
        assert isinstance(session, MuxSession)
        try:
            await scenario(session, listener, accepted)
        finally:
            await session.aclose()
            await listener.aclose()

    asyncio.run(main())


def test_large_payloads_keep_integrity_on_many_streams() -> None:
    async def scenario(session: MuxSession, *_: object) -> None:
        async def round_trip(size: int) -> None:
            payload = os.urandom(size)
            stream = await session.open_stream()
            sender = asyncio.create_task(stream.write(payload))
            await sender
            await stream.close_write()
            echoed = await read_all(stream)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

        await round_trip(4 * 1024 * 1024)
        await asyncio.gather(*(round_trip(64 * 1024 + i) for i in range(50)))

    run(scenario)


def test_streams_opened_by_the_server_and_half_close() -> None:
    async def scenario(
        session: MuxSession, _listener: TlsListener, accepted: asyncio.Queue[MuxSession]
    ) -> None:
        server_side = await accepted.get()
        outgoing = await server_side.open_stream()
        await outgoing.write(b"from the relay")
        await outgoing.close_write()
        incoming = await session.accept_stream()
        assert await read_all(incoming) == b"from the relay"
        await incoming.write(b"still writable after the peer's half-close")
        await incoming.close_write()
        assert await read_all(outgoing) == b"still writable after the peer's half-close"

    run(scenario, idle)


def test_reset_reaches_the_reader() -> None:
    async def scenario(
        session: MuxSession, _listener: TlsListener, accepted: asyncio.Queue[MuxSession]
    ) -> None:
        stream = await session.open_stream()
        await stream.write(b"partial")
        server_side = await accepted.get()
        peer = await server_side.accept_stream()
        assert await peer.read() == b"partial"
        await stream.aclose()
        with pytest.raises(StreamAborted):
            await peer.read()

    run(scenario, idle)


def test_slow_reader_bounds_buffered_memory() -> None:
    limits = MuxLimits(initial_window=64 * 1024)

    async def scenario(
        session: MuxSession, _listener: TlsListener, accepted: asyncio.Queue[MuxSession]
    ) -> None:
        stream = await session.open_stream()
        writer = asyncio.create_task(stream.write(b"x" * (8 * 1024 * 1024)))
        server_side = await accepted.get()
        peer = await server_side.accept_stream()
        # nobody reads yet: the window fills, and then the writer must wait
        while peer.buffered < limits.initial_window:
            peer._readable.clear()
            await peer._readable.wait()
        assert peer.buffered == limits.initial_window
        assert not writer.done()
        total = 0
        while total < 8 * 1024 * 1024:
            total += len(await peer.read(1024 * 1024))
            assert peer.buffered <= limits.initial_window
        await writer

    run(scenario, idle, limits)


def test_closing_the_session_reaches_every_stream() -> None:
    async def scenario(
        session: MuxSession, listener: TlsListener, accepted: asyncio.Queue[MuxSession]
    ) -> None:
        streams = [await session.open_stream() for _ in range(5)]
        server_side = await accepted.get()
        peers = [await server_side.accept_stream() for _ in streams]
        await session.aclose()
        for peer in peers:
            with pytest.raises(TransportClosed):
                await peer.read()
        with pytest.raises(TransportClosed):
            await server_side.accept_stream()
        with pytest.raises(TransportClosed):
            await streams[0].write(b"too late")

    run(scenario, idle)


def test_untrusted_certificate_is_rejected() -> None:
    async def main() -> None:
        server_tls, _ = loopback_tls()
        stranger = client_context(generate_ca("someone else").certificate)
        transport = TlsTransport()
        listener = await transport.serve(Endpoint("127.0.0.1", 0, server_tls), echo_streams)
        try:
            with pytest.raises(TlsVerificationFailed, match="not trusted"):
                await transport.connect(Endpoint("127.0.0.1", listener.port, stranger))
        finally:
            await listener.aclose()

    asyncio.run(main())


def test_connect_timeout_and_refused() -> None:
    async def main() -> None:
        _, client_tls = loopback_tls()
        with socket.socket() as silent:  # accepts TCP (backlog) but never speaks TLS
            silent.bind(("127.0.0.1", 0))
            silent.listen(1)
            port = silent.getsockname()[1]
            with pytest.raises(ConnectionTimeout):
                await TlsTransport().connect(
                    Endpoint("127.0.0.1", port, client_tls, connect_timeout=0.3)
                )
        with pytest.raises(ServerUnavailable, match="cannot connect"):
            await TlsTransport().connect(Endpoint("127.0.0.1", port, client_tls))

    asyncio.run(main())


def test_limits_come_from_the_transport_tls_section(tmp_path: Path) -> None:
    schema = merged_schema(load_plugins().config_sections())
    path = tmp_path / "c.yaml"
    path.write_text("transport:\n  tls:\n    max_frame_size: 16\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={}, schema=schema)
    assert [issue.path for issue in caught.value.issues] == ["transport.tls.max_frame_size"]
    settings = load_config(None, environ={}, schema=schema).get("transport.tls")
    assert settings == {
        "port": 5556,  # the relay's, not a multiplexer limit
        "max_frame_size": 65536,
        "initial_window": 262144,
        "max_streams": 1024,
    }
    section = plugin_settings(SETTINGS_SCHEMA, max_streams=7)
    transport = load_plugins().require("transport", "tls").load(section)
    assert transport._limits == MuxLimits(
        max_frame_size=65536, initial_window=262144, max_streams=7
    )
