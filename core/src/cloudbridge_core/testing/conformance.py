"""The transport conformance kit: what every transport must do, checked the same way.

Each check is a plain coroutine taking a :class:`TransportKit` (the transport under test
and the TLS material to use); :data:`CHECKS` lists them all. A transport's tests run
them all on loopback::

    from cloudbridge_core.testing.conformance import CHECKS, TransportKit, run_check

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check):
        run_check(check, TransportKit(MyTransport, send_oversized=my_oversized_frame))

``send_oversized`` is the one transport-specific part: it connects to the endpoint as a
misbehaving client and sends a single frame larger than the transport accepts.
:func:`oversized_mux_frame_over_tls` does that for transports carrying the core
multiplexer over TLS. Pytest users can import the ``conformance_check`` fixture from
:mod:`cloudbridge_core.testing.fixtures` instead, parametrised over every check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import socket
import ssl
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
from cloudbridge_core.protocol.mux import HEADER, Flag, FrameType, MuxLimits
from cloudbridge_core.providers import (
    Endpoint,
    Listener,
    Session,
    Stream,
    TlsMaterial,
    Transport,
)
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_core.testing.tls import loopback_material, loopback_tls
from cloudbridge_core.tlsutil import client_context, generate_ca
from cloudbridge_core.transports.preauth import PreauthGate, PreauthLimits

Handler = Callable[[Session], Awaitable[None]]


@dataclass
class TransportKit:
    """How to build the transport under test (called once per endpoint)."""

    make: Callable[[], Transport]
    send_oversized: Callable[[Endpoint], Awaitable[None]] | None = None
    host: str = "127.0.0.1"

    def server_endpoint(self, port: int = 0) -> Endpoint:
        server_tls, _ = loopback_tls()
        return Endpoint(self.host, port, server_tls, material=loopback_material()[0])

    def client_endpoint(self, port: int, connect_timeout: float = 5.0) -> Endpoint:
        _, client_tls = loopback_tls()
        material = loopback_material()[1]
        return Endpoint(self.host, port, client_tls, connect_timeout, material=material)

    @contextlib.asynccontextmanager
    async def pair(
        self, handler: Handler | None = None
    ) -> AsyncIterator[tuple[Session, asyncio.Queue[Session]]]:
        """A client session to a listener; server-side sessions arrive on the queue."""
        accepted: asyncio.Queue[Session] = asyncio.Queue()

        async def handle(session: Session) -> None:
            accepted.put_nowait(session)
            if handler is None:
                await asyncio.Event().wait()  # hold the session until the listener closes
            else:
                await handler(session)

        listener: Listener = await self.make().serve(self.server_endpoint(), handle)
        session = await self.make().connect(self.client_endpoint(listener.port))
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


async def reset_after_half_close_reaches_the_peer(kit: TransportKit) -> None:
    """``reset()`` is the relayed TCP RST, half-closed stream or not: after one end's
    reset the other end's writes fail within seconds, and its reads end in an error,
    never in a clean EOF for data it had not read. Checked for a reset by either end."""
    async with kit.pair() as (client, accepted):
        server = await asyncio.wait_for(accepted.get(), 10)
        for opener, acceptor in ((client, server), (server, client)):
            # the peer has read the EOF and is still sending when the resetting end resets
            stream = await opener.open_stream()
            await stream.write(b"request")
            await stream.close_write()
            peer = await asyncio.wait_for(acceptor.accept_stream(), 10)
            assert await asyncio.wait_for(read_all(peer), 10) == b"request"
            await peer.write(b"first part of the response")
            assert await asyncio.wait_for(stream.read(), 10) == b"first part of the response"
            await stream.reset()
            await _writes_fail(peer, "a reset after this end's EOF")

            # the resetting end half-closes and resets before the peer has read anything
            stream = await opener.open_stream()
            await stream.write(b"a request the peer never reads in full")
            await stream.close_write()
            peer = await asyncio.wait_for(acceptor.accept_stream(), 10)
            await stream.reset()
            await _writes_fail(peer, "a reset right after the EOF")
            try:
                await asyncio.wait_for(read_all(peer), 10)
            except TransportError:
                continue
            raise AssertionError("a reset stream ended in a clean EOF for its peer")


async def _writes_fail(stream: Stream, case: str) -> None:
    """Write until a write fails, as a pump forwarding its socket's bytes would."""
    try:
        async with asyncio.timeout(10):
            while True:
                await stream.write(b"more of the response" * 64)
    except TransportError:
        return
    except TimeoutError:
        raise AssertionError(f"the peer could still write 10 s after {case}") from None


async def reset_is_idempotent_and_quiet(kit: TransportKit) -> None:
    """``reset()`` never raises (twice, after the peer's reset, on a finished stream, after
    the session's end), and a stream finished both ways stays finished for the peer."""
    async with kit.pair() as (client, accepted):
        server = await asyncio.wait_for(accepted.get(), 10)
        stream = await client.open_stream()
        await stream.write(b"partial")
        peer = await asyncio.wait_for(server.accept_stream(), 10)
        assert await asyncio.wait_for(peer.read(), 10) == b"partial"
        await stream.reset()
        await stream.reset()
        try:
            await asyncio.wait_for(read_all(peer), 10)
        except StreamAborted:
            pass
        else:
            raise AssertionError("the peer read on after a reset")
        await peer.reset()  # after the peer's own reset

        finished = await client.open_stream()
        await finished.write(b"question")
        await finished.close_write()
        peer = await asyncio.wait_for(server.accept_stream(), 10)
        await peer.write(b"answer")
        await peer.close_write()
        assert await asyncio.wait_for(read_all(finished), 10) == b"answer"
        await finished.reset()  # both ways finished here: nothing to reset
        assert await asyncio.wait_for(read_all(peer), 10) == b"question"

        open_at_the_end = await client.open_stream()
        await open_at_the_end.write(b"hello")
        peer = await asyncio.wait_for(server.accept_stream(), 10)
        await client.aclose()
        await open_at_the_end.reset()
        await peer.reset()


async def _only_classified(case: str, call: Awaitable[object]) -> bool:
    """Await ``call``: it may succeed or raise a :class:`TransportError` (True), nothing
    else (a library's own exception would escape the pumps and retries above the transport)."""
    try:
        await asyncio.wait_for(call, 10)
    except TransportError:
        return True
    except TimeoutError:
        raise AssertionError(f"{case}: still waiting after 10 s") from None
    except Exception as error:
        raise AssertionError(
            f"{case}: raised {type(error).__module__}.{type(error).__qualname__}: {error}"
            " instead of a TransportError"
        ) from error
    return False


async def _raises_classified(case: str, call: Awaitable[object]) -> None:
    """Like :func:`_only_classified`, and ``call`` must fail."""
    if not await _only_classified(case, call):
        raise AssertionError(f"{case}: succeeded")


async def streams_raise_only_classified_errors(kit: TransportKit) -> None:
    """A stream used after it ended (reset by either end, its session closed by either
    end) raises only :class:`TransportError` subclasses, never its library's exceptions:
    writes and reads fail, ``close_write`` fails or does nothing, ``reset``/``aclose``
    never raise."""
    async with kit.pair() as (client, accepted):
        server = await asyncio.wait_for(accepted.get(), 10)

        # reset by this end: every later use
        stream = await client.open_stream()
        await stream.write(b"hello")
        peer = await asyncio.wait_for(server.accept_stream(), 10)
        assert await asyncio.wait_for(peer.read(), 10) == b"hello"
        await stream.reset()
        await _raises_classified("write after a local reset", stream.write(b"more"))
        await _raises_classified("read after a local reset", stream.read())
        await _only_classified("close_write after a local reset", stream.close_write())
        await _only_classified("aclose after a local reset", stream.aclose())

        # reset by the peer: writes fail within seconds, reads fail, then the same calls
        await _only_classified("read after the peer's reset", read_all(peer))
        await _writes_fail(peer, "the peer's reset")
        await _raises_classified("write after the peer's reset", peer.write(b"more"))
        await _raises_classified("read after the peer's reset", peer.read())
        await _only_classified("close_write after the peer's reset", peer.close_write())
        await _only_classified("reset after the peer's reset", peer.reset())

        # half-closed by this end, then reset by the peer
        stream = await client.open_stream()
        await stream.write(b"request")
        await stream.close_write()
        peer = await asyncio.wait_for(server.accept_stream(), 10)
        assert await asyncio.wait_for(read_all(peer), 10) == b"request"
        await peer.reset()
        await _writes_fail(peer, "its own reset")
        await _only_classified("read after the peer's reset", read_all(stream))
        await _raises_classified("write after close_write", stream.write(b"more"))
        await _only_classified("close_write twice", stream.close_write())

        # the session closed by this end and by the peer
        mine = await client.open_stream()
        await mine.write(b"hello")
        theirs = await asyncio.wait_for(server.accept_stream(), 10)
        assert await asyncio.wait_for(theirs.read(), 10) == b"hello"
        await client.aclose()
        await _raises_classified("write after the session closed", mine.write(b"more"))
        await _raises_classified("read after the session closed", mine.read())
        await _only_classified("close_write after the session closed", mine.close_write())
        await _only_classified("aclose after the session closed", mine.aclose())
        await _raises_classified("open_stream after the session closed", client.open_stream())
        await _only_classified("read after the peer closed the session", read_all(theirs))
        await _writes_fail(theirs, "the peer closed the session")
        await _only_classified("close_write after the peer closed", theirs.close_write())
        await _only_classified("aclose after the peer closed", theirs.aclose())


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
            try:
                await asyncio.wait_for(read_all(peer), 10)
            except TransportError:
                continue
            raise AssertionError("a stream cut by the session's end ended in a clean EOF")
        try:
            await asyncio.wait_for(server.accept_stream(), 10)
        except TransportError:
            return
        raise AssertionError("the server accepted a stream after the client closed the session")


async def connect_timeout(kit: TransportKit) -> None:
    # accepts TCP in its backlog and UDP in its buffer, never answers either
    with socket.socket() as silent, socket.socket(type=socket.SOCK_DGRAM) as silent_udp:
        silent.bind((kit.host, 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        silent_udp.bind((kit.host, port))
        endpoint = kit.client_endpoint(port, connect_timeout=0.5)
        try:
            await asyncio.wait_for(kit.make().connect(endpoint), 10)
        except ConnectionTimeout:
            return
    raise AssertionError("connect did not time out")


async def untrusted_certificate_rejected(kit: TransportKit) -> None:
    someone_else = generate_ca("someone else").certificate
    listener = await kit.make().serve(kit.server_endpoint(), echo_streams)
    stranger = Endpoint(
        kit.host, listener.port, client_context(someone_else), material=TlsMaterial(ca=someone_else)
    )
    try:
        await kit.make().connect(stranger)
    except TlsVerificationFailed:
        return
    except CloudBridgeError as error:
        raise AssertionError(f"expected tls_verify_failed, got {error.code}") from error
    finally:
        await listener.aclose()
    raise AssertionError("a server with an untrusted certificate was accepted")


async def oversized_frame_rejected(kit: TransportKit) -> None:
    """A frame over the limit never reaches a reader, and the listener serves on."""
    if kit.send_oversized is None:
        raise AssertionError("TransportKit.send_oversized is needed for this check")
    delivered = 0

    async def count(stream: Stream) -> None:
        nonlocal delivered
        with contextlib.suppress(TransportError):
            while chunk := await stream.read():
                delivered += len(chunk)

    async def handler(session: Session) -> None:
        with contextlib.suppress(TransportError):
            while True:
                stream = await session.accept_stream()
                asyncio.create_task(count(stream))  # noqa: RUF006 - ends with the session

    listener = await kit.make().serve(kit.server_endpoint(), handler)
    try:
        endpoint = kit.client_endpoint(listener.port)
        with contextlib.suppress(TransportError):
            await asyncio.wait_for(kit.send_oversized(endpoint), 10)
        await asyncio.sleep(0.2)
        assert delivered == 0, f"{delivered} bytes of an oversized frame reached a reader"
    finally:
        await listener.aclose()
    await echo_still_works(kit)


async def preauth_budget_held(kit: TransportKit) -> None:
    """Served with a pre-auth gate (``Endpoint.preauth``), a session its handler never
    authenticates ends at the gate's deadline and gives its place back; one that says
    hello and is authenticated (``Session.authenticated``) keeps going past it."""
    gate = PreauthGate(lambda: PreauthLimits(timeout=1.0))
    endpoint = dataclasses.replace(kit.server_endpoint(), preauth=gate)

    async def handle(session: Session) -> None:
        with contextlib.suppress(TransportError):  # the silent session ends at the deadline
            hello = await session.accept_stream()
            assert await hello.read() == b"hello"
            session.authenticated()
            await hello.write(b"welcome")
            while True:
                stream = await session.accept_stream()
                await stream.write(await stream.read())

    listener = await kit.make().serve(endpoint, handle)
    silent = await kit.make().connect(kit.client_endpoint(listener.port))
    greeted = await kit.make().connect(kit.client_endpoint(listener.port))
    try:
        hello = await greeted.open_stream()
        await hello.write(b"hello")
        assert await asyncio.wait_for(hello.read(), 10) == b"welcome"
        try:
            await asyncio.wait_for(silent.accept_stream(), 10)
        except TransportError:
            pass
        else:
            raise AssertionError("the server opened a stream to an unauthenticated peer")
        later = await greeted.open_stream()  # after the deadline
        await later.write(b"still here")
        assert await asyncio.wait_for(later.read(), 10) == b"still here"
        assert gate.pending == 0, "an ended or authenticated session kept its pre-auth place"
    finally:
        await silent.aclose()
        await greeted.aclose()
        await listener.aclose()


async def echo_still_works(kit: TransportKit) -> None:
    async with kit.pair(echo_streams) as (client, _):
        stream = await client.open_stream()
        await stream.write(b"still serving")
        await stream.close_write()
        assert await read_all(stream) == b"still serving"


async def oversized_mux_frame_over_tls(endpoint: Endpoint) -> None:
    """``send_oversized`` for transports carrying the core multiplexer over plain TLS."""
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=endpoint.tls)
    try:
        writer.write(oversized_mux_frame())
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # the relay hangs up
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def oversized_mux_frame() -> bytes:
    """The start of a DATA frame opening a stream, one byte over the default limit."""
    size = MuxLimits().max_frame_size + 1
    return HEADER.pack(FrameType.DATA, Flag.SYN, 1, size) + b"x" * size


CHECKS: list[Callable[[TransportKit], Awaitable[None]]] = [
    both_ends_open_streams,
    large_payload_integrity,
    half_close,
    reset_reaches_the_peer,
    reset_after_half_close_reaches_the_peer,
    reset_is_idempotent_and_quiet,
    streams_raise_only_classified_errors,
    two_hundred_concurrent_streams,
    slow_reader_bounds_memory,
    session_close_reaches_every_stream,
    connect_timeout,
    untrusted_certificate_rejected,
    oversized_frame_rejected,
    preauth_budget_held,
]


def run_check(
    check: Callable[[TransportKit], Awaitable[None]],
    kit: TransportKit,
    timeout: float = 60,
    *,
    runner: asyncio.Runner | None = None,
) -> Any:
    """Run one check, bounded in time, in a fresh event loop or in ``runner``'s: one loop
    for every check suits a library that completes a call's last operations on the loop
    that started it after the call has ended (grpc.aio: in a fresh loop per check, such a
    completion meets a closed loop and is reported in the next check). Tasks a check
    leaves behind are cancelled. What the loop reports fails the check too (an exception
    in a callback, a task's exception never retrieved: a library exception that escaped
    the transport)."""
    reported: list[str] = []

    async def checked() -> Any:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(_describe(context)))
        before = asyncio.all_tasks()
        try:
            return await asyncio.wait_for(check(kit), timeout)
        finally:
            leftovers = asyncio.all_tasks() - before
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    result = asyncio.run(checked()) if runner is None else runner.run(checked())
    if reported:
        raise AssertionError("the event loop reported: " + "; ".join(reported))
    return result


def _describe(context: dict[str, Any]) -> str:
    error = context.get("exception")
    where = f"{context.get('message', 'an error')}"
    return where if error is None else f"{where}: {type(error).__qualname__}: {error}"
