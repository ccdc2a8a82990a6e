"""The transport conformance kit: what every transport must do, checked the same way.

Each check is a plain coroutine taking a :class:`TransportKit` (the transport under test
and the TLS material to use); :data:`CHECKS` lists them all. A transport's tests run
them all on loopback::

    from cloudbridge_core.testing.conformance import CHECKS, TransportKit, run_check

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check):
        run_check(check, TransportKit(MyTransport))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cloudbridge_core.errors import (
    CloudBridgeError,
    ConnectionTimeout,
    StreamAborted,
    TlsVerificationFailed,
    TransportError,
)
from cloudbridge_core.providers import Endpoint, Listener, Session, Transport
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_core.testing.tls import loopback_tls
from cloudbridge_core.tlsutil import client_context, generate_ca

Handler = Callable[[Session], Awaitable[None]]


@dataclass
class TransportKit:
    """How to build the transport under test (called once per endpoint)."""

    make: Callable[[], Transport]
    host: str = "127.0.0.1"

    @contextlib.asynccontextmanager
    async def pair(
        self, handler: Handler | None = None
    ) -> AsyncIterator[tuple[Session, asyncio.Queue[Session]]]:
        """A client session to a listener; server-side sessions arrive on the queue."""
        server_tls, client_tls = loopback_tls()
        accepted: asyncio.Queue[Session] = asyncio.Queue()

        async def handle(session: Session) -> None:
            accepted.put_nowait(session)
            if handler is None:
                await asyncio.Event().wait()  # hold the session until the listener closes
            else:
                await handler(session)

        listener: Listener = await self.make().serve(Endpoint(self.host, 0, server_tls), handle)
        session = await self.make().connect(Endpoint(self.host, listener.port, client_tls))
        try:
            yield session, accepted
        finally:
            await session.aclose()
            await listener.aclose()


async def both_ends_open_streams(kit: TransportKit) -> None:
    async with kit.pair() as (client, accepted):
        server = await asyncio.wait_for(accepted.get(), 10)
        outgoing = await client.open_stream()
        await outgoing.write(b"from the client")
        incoming = await server.accept_stream()
        assert await incoming.read() == b"from the client"
        reverse = await server.open_stream()
        await reverse.write(b"from the server")
        arrived = await client.accept_stream()
        assert await arrived.read() == b"from the server"


async def large_payload_integrity(kit: TransportKit) -> None:
    async with kit.pair(echo_streams) as (client, _):
        payload = os.urandom(16 * 1024 * 1024)
        stream = await client.open_stream()
        writer = asyncio.create_task(stream.write(payload))
        echoed = asyncio.create_task(read_all(stream))
        await writer
        await stream.close_write()
        assert hashlib.sha256(await echoed).digest() == hashlib.sha256(payload).digest()


async def half_close(kit: TransportKit) -> None:
    async with kit.pair() as (client, accepted):
        stream = await client.open_stream()
        await stream.write(b"question")
        await stream.close_write()
        server = await asyncio.wait_for(accepted.get(), 10)
        peer = await server.accept_stream()
        assert await read_all(peer) == b"question"  # EOF after the data
        await peer.write(b"answer after the peer's half-close")
        await peer.close_write()
        assert await read_all(stream) == b"answer after the peer's half-close"


async def reset_reaches_the_peer(kit: TransportKit) -> None:
    async with kit.pair() as (client, accepted):
        stream = await client.open_stream()
        await stream.write(b"partial")
        server = await asyncio.wait_for(accepted.get(), 10)
        peer = await server.accept_stream()
        assert await peer.read() == b"partial"
        await stream.aclose()  # not half-closed by the peer: a reset
        try:
            await asyncio.wait_for(peer.read(), 10)
        except StreamAborted:
            return
        raise AssertionError("the peer read on after a reset")


async def two_hundred_concurrent_streams(kit: TransportKit) -> None:
    async with kit.pair(echo_streams) as (client, _):

        async def one(index: int) -> None:
            stream = await client.open_stream()
            payload = index.to_bytes(4, "big") * (1000 + index)
            await stream.write(payload)
            await stream.close_write()
            assert await read_all(stream) == payload

        await asyncio.gather(*(one(i) for i in range(200)))


async def slow_reader_bounds_memory(kit: TransportKit) -> None:
    """A reader that does not read makes the writer wait instead of buffering everything."""
    async with kit.pair() as (client, accepted):
        stream = await client.open_stream()
        total = 64 * 1024 * 1024
        writer = asyncio.create_task(stream.write(b"x" * total))
        server = await asyncio.wait_for(accepted.get(), 10)
        peer = await server.accept_stream()
        first = await peer.read()
        assert first
        done, _ = await asyncio.wait({writer}, timeout=0.5)
        assert not done, "64 MiB were accepted with nobody reading: no flow control"
        received = len(first)
        while received < total:
            received += len(await peer.read(1 << 20))
        await writer


async def session_close_reaches_every_stream(kit: TransportKit) -> None:
    async with kit.pair() as (client, accepted):
        streams = [await client.open_stream() for _ in range(5)]
        for stream in streams:
            await stream.write(b"hello")
        server = await asyncio.wait_for(accepted.get(), 10)
        peers = [await server.accept_stream() for _ in streams]
        await client.aclose()
        for peer in peers:
            with contextlib.suppress(TransportError):
                await asyncio.wait_for(read_all(peer), 10)
        try:
            await asyncio.wait_for(server.accept_stream(), 10)
        except TransportError:
            return
        raise AssertionError("the server accepted a stream after the client closed the session")


async def connect_timeout(kit: TransportKit) -> None:
    _, client_tls = loopback_tls()
    with socket.socket() as silent:  # accepts TCP in its backlog, never answers
        silent.bind((kit.host, 0))
        silent.listen(1)
        endpoint = Endpoint(kit.host, silent.getsockname()[1], client_tls, connect_timeout=0.5)
        try:
            await asyncio.wait_for(kit.make().connect(endpoint), 10)
        except ConnectionTimeout:
            return
    raise AssertionError("connect did not time out")


async def untrusted_certificate_rejected(kit: TransportKit) -> None:
    server_tls, _ = loopback_tls()
    stranger = client_context(generate_ca("someone else").certificate)
    listener = await kit.make().serve(Endpoint(kit.host, 0, server_tls), echo_streams)
    try:
        await kit.make().connect(Endpoint(kit.host, listener.port, stranger))
    except TlsVerificationFailed:
        return
    except CloudBridgeError as error:
        raise AssertionError(f"expected tls_verify_failed, got {error.code}") from error
    finally:
        await listener.aclose()
    raise AssertionError("a server with an untrusted certificate was accepted")


CHECKS: list[Callable[[TransportKit], Awaitable[None]]] = [
    both_ends_open_streams,
    large_payload_integrity,
    half_close,
    reset_reaches_the_peer,
    two_hundred_concurrent_streams,
    slow_reader_bounds_memory,
    session_close_reaches_every_stream,
    connect_timeout,
    untrusted_certificate_rejected,
]


def run_check(
    check: Callable[[TransportKit], Awaitable[None]], kit: TransportKit, timeout: float = 60
) -> Any:
    """Run one check in a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(check(kit), timeout))
