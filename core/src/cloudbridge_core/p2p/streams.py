"""Streams between peers: a ``peer_open`` header (port and proof), accept or reject, then
the bytes of one TCP connection, both ways, carried by the core's pump exactly as on a
relayed tunnel (half-close passes through; a reset, a refused target or a lost session
reaches the other end as a reset).

A peer tunnel opens its streams as a relayed tunnel does (:func:`open_peer_stream_at_once`):
the application's first bytes follow the header at once and the answer is read off the
front of what comes back, so a setup waits for no round trip of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from cloudbridge_core.client.opening import OpeningStream
from cloudbridge_core.errors import (
    CloudBridgeError,
    TargetUnreachable,
    TransportError,
    Unauthorized,
    error_for_code,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.session import PeerSession
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Stream
from cloudbridge_core.pump import connect, prepare, pump
from cloudbridge_core.transports.mux_session import MuxStream
from cloudbridge_core.wire import MessageStream

log = get_logger("p2p.streams")

HEADER_TIMEOUT = 10.0
#: a stream's accept waits this long at most for the target's first bytes to go with it
#: (as a relay's does; the opener does not wait for it)
ACCEPT_JOINS_DATA_WITHIN = 0.001
ACCEPT = messages.encode(messages.Accept())


async def open_peer_stream(
    session: PeerSession, port: int, proof: str, within: float
) -> tuple[Stream, bytes]:
    """A stream to ``port`` on the peer, accepted; and the first bytes the peer's target
    sent, which arrived with the acceptance."""
    stream = await session.open_stream()
    header = MessageStream(stream)
    try:
        await header.send(messages.PeerOpen(port, proof))
        reply = await asyncio.wait_for(header.expect(messages.Accept, messages.Reject), within)
    except TimeoutError:
        await stream.reset()
        raise TargetUnreachable(f"{session.peer.name} did not answer in {within:g}s") from None
    except BaseException:
        await stream.reset()
        raise
    if isinstance(reply, messages.Reject):
        await stream.reset()
        raise error_for_code(reply.code, reply.message)
    return stream, header.take_buffered()


async def open_peer_stream_at_once(
    session: PeerSession, port: int, proof: str, first: bytes, accepted: Callable[[], None]
) -> OpeningStream:
    """A stream to ``port`` on the peer carrying ``first`` right behind its header, without
    waiting for the answer: the stream reads it off the front of what comes back, calls
    ``accepted`` on an accept and fails with the peer's error on a reject (see
    :class:`~cloudbridge_core.client.opening.OpeningStream`)."""
    stream = await session.open_stream()
    await stream.write(messages.encode(messages.PeerOpen(port, proof)) + first)
    return OpeningStream(stream, accepted)


async def accept_peer_stream(
    stream: Stream,
    identity: DeviceIdentity,
    peer_key: bytes,
    exposed: set[int],
    peer_name: str,
) -> None:
    """Serve a stream a peer opened: only to an exposed port, only with a valid proof."""
    target = await _admit(stream, identity, peer_key, exposed, peer_name)
    if target is not None:
        # pumped from here: the header's reader and message are not held while it runs
        await pump(stream, target)


async def _admit(
    stream: Stream,
    identity: DeviceIdentity,
    peer_key: bytes,
    exposed: set[int],
    peer_name: str,
) -> socket.socket | None:
    """The target, connected and sent what came with the header, once the stream is
    accepted; None when it is refused (the stream is ended then)."""
    header = MessageStream(stream)
    target: socket.socket | None = None
    try:
        async with asyncio.timeout(HEADER_TIMEOUT):  # no task per stream, as wait_for makes
            request = await header.expect(messages.PeerOpen)
        assert isinstance(request, messages.PeerOpen)  # expect() checked it
        if not identity.accepts_proof(peer_key, request.proof):
            raise Unauthorized("the stream's proof does not match the peer's key")
        if request.port not in exposed:
            raise Unauthorized(f"port {request.port} is not exposed (p2p.expose)")
        target = await _connect(request.port)
        if isinstance(stream, MuxStream) and stream.direct:
            # in one record with the target's first bytes when they come soon enough
            stream.send_soon(ACCEPT, ACCEPT_JOINS_DATA_WITHIN)
        else:
            await header.send(messages.Accept())
        early = header.take_buffered()
        if early:
            await asyncio.get_running_loop().sock_sendall(target, early)
    except (CloudBridgeError, TimeoutError, OSError) as error:
        if target is not None:
            target.close()
        await _refuse(stream, error, peer_name)
        return None
    except BaseException:
        if target is not None:
            target.close()
        await stream.reset()
        raise
    return target


async def _connect(port: int) -> socket.socket:
    sock = prepare(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        await connect(sock, ("127.0.0.1", port))  # no resolver thread per dial
    except OSError as exc:
        sock.close()
        raise TargetUnreachable(f"nothing listens on port {port}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def _refuse(stream: Stream, error: BaseException, peer_name: str) -> None:
    """Say why (a reject the opener raises as its error), then end the stream."""
    if isinstance(error, CloudBridgeError):
        code, reason = error.code, error.message
    else:
        code, reason = ("timeout" if isinstance(error, TimeoutError) else "io_error"), str(error)
    log.info("peer_stream_refused", peer=peer_name, code=code, reason=reason)
    if isinstance(error, CloudBridgeError):
        with contextlib.suppress(TransportError):
            await MessageStream(stream).send(messages.Reject(error.code, error.message))
            await stream.close_write()
            return
    await stream.reset()
