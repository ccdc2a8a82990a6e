"""Streams between peers: a ``peer_open`` header (port and proof), accept or reject, then
the bytes of one TCP connection, both ways, with half-close."""

from __future__ import annotations

import asyncio
import contextlib

from cloudbridge_core.errors import (
    CloudBridgeError,
    ProtocolViolation,
    TargetUnreachable,
    Unauthorized,
    error_for_code,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.session import PeerSession
from cloudbridge_core.protocol import messages

log = get_logger("p2p.streams")

CHUNK = 65536
HEADER_TIMEOUT = 10.0


async def read_message(reader: asyncio.StreamReader) -> messages.Message:
    try:
        length = messages.LENGTH.unpack(await reader.readexactly(messages.LENGTH.size))[0]
        if length > messages.MAX_MESSAGE_SIZE:
            raise ProtocolViolation(f"a {length}-byte message exceeds the limit")
        return messages.decode_body(await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        raise ProtocolViolation("the stream ended inside a message") from None


async def open_peer_stream(
    session: PeerSession, port: int, proof: str, within: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await session.open_stream()
    writer.write(messages.encode(messages.PeerOpen(port, proof)))
    try:
        reply = await asyncio.wait_for(read_message(reader), within)
    except TimeoutError:
        writer.close()
        raise TargetUnreachable(f"{session.peer.name} did not answer in {within:g}s") from None
    if isinstance(reply, messages.Reject):
        writer.close()
        raise error_for_code(reply.code, reply.message)
    if not isinstance(reply, messages.Accept):
        writer.close()
        raise ProtocolViolation(f"expected accept or reject, got {reply.TYPE}")
    return reader, writer


async def accept_peer_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: DeviceIdentity,
    peer_key: bytes,
    exposed: set[int],
    peer_name: str,
) -> None:
    """Serve a stream a peer opened: only to an exposed port, only with a valid proof."""
    try:
        request = await asyncio.wait_for(read_message(reader), HEADER_TIMEOUT)
        if not isinstance(request, messages.PeerOpen):
            raise ProtocolViolation(f"expected peer_open, got {request.TYPE}")
        if not identity.accepts_proof(peer_key, request.proof):
            raise Unauthorized("the stream's proof does not match the peer's key")
        if request.port not in exposed:
            raise Unauthorized(f"port {request.port} is not exposed (p2p.expose)")
        try:
            local_reader, local_writer = await asyncio.open_connection("127.0.0.1", request.port)
        except OSError as exc:
            raise TargetUnreachable(f"nothing listens on port {request.port}") from exc
    except (CloudBridgeError, TimeoutError) as error:
        code = error.code if isinstance(error, CloudBridgeError) else "timeout"
        log.info("peer_stream_refused", peer=peer_name, code=code, reason=str(error))
        if isinstance(error, CloudBridgeError):
            writer.write(messages.encode(messages.Reject(error.code, error.message)))
        writer.close()
        return
    writer.write(messages.encode(messages.Accept()))
    await pump(reader, writer, local_reader, local_writer)


async def pump(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> tuple[int, int]:
    """Copy both ways until both sides have finished, then close both; returns the bytes
    copied from a to b and from b to a."""
    try:
        forward, backward = await asyncio.gather(
            _copy(a_reader, b_writer), _copy(b_reader, a_writer)
        )
    finally:
        for writer in (a_writer, b_writer):
            writer.close()
    return forward, backward


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    copied = 0
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            copied += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    return copied
