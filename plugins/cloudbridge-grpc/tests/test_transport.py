"""gRPC specifics on real loopback sockets: discovery, health, sessions, keepalive, the .proto."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import socket

import grpc
import pytest
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import ConfigError, ServerUnavailable, TransportClosed, TransportError
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.providers import Session, Stream
from cloudbridge_core.testing.conformance import TransportKit
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_core.transports.preauth import PreauthGate, PreauthLimits
from cloudbridge_grpc._generated import tunnel_pb2
from cloudbridge_grpc.hooks import SETTINGS_SCHEMA
from cloudbridge_grpc.sessions import PREAUTH_BYTES
from cloudbridge_grpc.transport import MIN_KEEPALIVE_INTERVAL, SERVICE, GrpcTransport
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

pytestmark = pytest.mark.timeout(60)
SETTINGS = plugin_settings(SETTINGS_SCHEMA)
KIT = TransportKit(lambda: GrpcTransport(SETTINGS))


def test_discovered_between_websocket_and_quic() -> None:
    plugins = load_plugins()
    [record] = [r for r in plugins.records if r.name == "grpc"]
    assert record.status == "active"
    assert record.providers == {"transport": ["grpc"]}
    order = list(plugins.providers("transport"))
    assert order.index("websocket") < order.index("grpc") < order.index("quic")


def test_the_standard_health_service_answers_serving() -> None:
    async def main() -> None:
        listener = await GrpcTransport(SETTINGS).serve(KIT.server_endpoint(), echo_streams)
        material = KIT.client_endpoint(listener.port).material
        assert material is not None
        credentials = grpc.ssl_channel_credentials(root_certificates=material.ca)
        async with grpc.aio.secure_channel(f"127.0.0.1:{listener.port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Watch would hold an unauthenticated call open for ever
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await watch.read()
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        await listener.aclose()

    asyncio.run(main())


def test_writes_larger_than_a_message_are_split() -> None:
    async def main() -> None:
        transport = GrpcTransport(plugin_settings(SETTINGS_SCHEMA, max_message_bytes=65536))
        listener = await transport.serve(KIT.server_endpoint(), echo_streams)
        session = await transport.connect(KIT.client_endpoint(listener.port))
        stream = await session.open_stream()
        payload = bytes(range(256)) * 4096  # 1 MiB in one write
        writer = asyncio.create_task(stream.write(payload))
        echoed = asyncio.create_task(read_all(stream))
        await writer
        await stream.close_write()
        assert await echoed == payload
        await session.aclose()
        await listener.aclose()

    asyncio.run(main())


def test_closing_a_session_on_the_server_ends_the_clients_streams() -> None:
    async def close_after_one_stream(session: Session) -> None:
        stream = await session.accept_stream()
        assert await stream.read() == b"hello"
        await session.aclose()

    async def main() -> None:
        async with KIT.pair(close_after_one_stream) as (client, _):
            stream = await client.open_stream()
            await stream.write(b"hello")
            with pytest.raises(TransportClosed):
                await asyncio.wait_for(stream.read(), 10)
            with pytest.raises(TransportClosed):
                await asyncio.wait_for(client.accept_stream(), 10)
            with pytest.raises(TransportClosed):
                await client.open_stream()

    asyncio.run(main())


def test_closing_a_session_on_the_client_ends_the_servers_streams() -> None:
    async def main() -> None:
        async with KIT.pair() as (client, accepted):
            streams = [await client.open_stream() for _ in range(20)]
            for stream in streams:
                await stream.write(b"hello")
            server = await asyncio.wait_for(accepted.get(), 10)
            peers = [await server.accept_stream() for _ in streams]
            for peer in peers:
                assert await peer.read() == b"hello"
            await client.aclose()
            for peer in peers:
                with pytest.raises(TransportClosed):
                    await asyncio.wait_for(peer.read(), 10)
            with pytest.raises(TransportClosed):
                await asyncio.wait_for(server.accept_stream(), 10)

    asyncio.run(main())


def test_a_read_that_timed_out_leaves_the_stream_usable() -> None:
    # grpcio cancels a call whose reading task is cancelled; the stream must not
    async def main() -> None:
        async with KIT.pair() as (client, accepted):
            stream = await client.open_stream()
            await stream.write(b"hello")
            server = await asyncio.wait_for(accepted.get(), 10)
            peer = await server.accept_stream()
            assert await peer.read() == b"hello"
            for reader in (stream, peer):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.read(), 0.2)
            await stream.write(b"ping")
            assert await peer.read() == b"ping"
            await peer.write(b"pong")
            assert await stream.read() == b"pong"

    asyncio.run(main())


def test_a_failing_session_handler_is_logged_and_the_listener_serves_on() -> None:
    calls = 0

    async def fails_first(session: Session) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the handler")
        await echo_streams(session)

    async def main() -> None:
        transport = GrpcTransport(SETTINGS)
        listener = await transport.serve(KIT.server_endpoint(), fails_first)
        first = await transport.connect(KIT.client_endpoint(listener.port))
        with pytest.raises(TransportClosed):  # the failed handler's session was closed
            await asyncio.wait_for(first.accept_stream(), 10)
        second = await transport.connect(KIT.client_endpoint(listener.port))
        stream = await second.open_stream()
        await stream.write(b"still serving")
        await stream.close_write()
        assert await read_all(stream) == b"still serving"
        for closing in (first, second, listener):
            await closing.aclose()

    with capture_logs() as logs:
        asyncio.run(main())
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["session_handler_failed"]


def test_a_client_with_the_shortest_keepalive_outlives_many_pings() -> None:
    # gRPC servers end connections that ping more often than every 5 minutes by default,
    # and the relay refuses fast pings: a client pinging every second, the shortest
    # interval it may set, against a relay keeping the default 20 s, is not told
    # too_many_pings (that GOAWAY would come after three pings)
    relay = GrpcTransport(SETTINGS)
    shortest = f"{MIN_KEEPALIVE_INTERVAL:g}s"
    client = GrpcTransport(
        plugin_settings(SETTINGS_SCHEMA, keepalive_interval=shortest, keepalive_timeout="1s")
    )

    async def main() -> None:
        listener = await relay.serve(KIT.server_endpoint(), echo_streams)
        session = await client.connect(KIT.client_endpoint(listener.port))
        await asyncio.sleep(6)
        stream = await session.open_stream()
        await stream.write(b"after the pings")
        await stream.close_write()
        assert await read_all(stream) == b"after the pings"
        await session.aclose()
        await listener.aclose()

    asyncio.run(main())


def test_a_keepalive_shorter_than_the_relay_accepts_is_a_config_error() -> None:
    schema = merged_schema(load_plugins().config_sections())
    short = {"transport.grpc.keepalive_interval": ("200ms", "test")}
    with pytest.raises(ConfigError, match="keepalive_interval"):
        load_config(None, environ={}, overrides=short, schema=schema)


def test_a_stranger_sending_more_than_a_hello_is_ended_at_once() -> None:
    """Before authentication a session's stream carries its hello (32 KiB at most): more
    ends the session at once, even when nobody reads it, not at the pre-auth deadline."""
    gate = PreauthGate(lambda: PreauthLimits(timeout=30.0))
    endpoint = dataclasses.replace(KIT.server_endpoint(), preauth=gate)

    async def never_reads(session: Session) -> None:
        await session.accept_stream()
        with contextlib.suppress(TransportError):
            await session.accept_stream()  # until the session ends

    async def main() -> None:
        transport = GrpcTransport(SETTINGS)
        listener = await transport.serve(endpoint, never_reads)
        session = await transport.connect(KIT.client_endpoint(listener.port))
        stream = await session.open_stream()
        with contextlib.suppress(TransportError):
            await stream.write(b"\0" * (PREAUTH_BYTES + 1))
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(session.accept_stream(), 10)
        assert gate.pending == 0
        await session.aclose()
        await listener.aclose()

    asyncio.run(main())


def test_nobody_listening_is_server_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServerUnavailable):
        asyncio.run(GrpcTransport(SETTINGS).connect(KIT.client_endpoint(port)))


def test_the_proto_declares_the_two_streaming_calls() -> None:
    service = tunnel_pb2.DESCRIPTOR.services_by_name["Tunnel"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Session": (True, True), "Stream": (True, True)}
    assert tunnel_pb2.DESCRIPTOR.package == "cloudbridge.v1"


def test_a_taken_port_is_the_os_error_not_a_shared_port() -> None:
    """grpc binds with SO_REUSEPORT unless told not to: a second relay would share the port."""

    async def scenario() -> None:
        first = await GrpcTransport(SETTINGS).serve(KIT.server_endpoint(), echo_streams)
        try:
            with pytest.raises(OSError, match=r"[Aa]ddress already in use") as refused:
                await GrpcTransport(SETTINGS).serve(KIT.server_endpoint(first.port), echo_streams)
            assert refused.value.errno == errno.EADDRINUSE
        finally:
            await first.aclose()

    asyncio.run(scenario())


def test_writes_under_way_as_the_session_closes_end_with_a_transport_error() -> None:
    """grpc reports a write that fails because the call was cancelled under it as its own
    CancelledError, with the status INTERNAL rather than CANCELLED: before, that escaped
    the writer (seen in the pre-auth test under load)."""
    piece = b"\0" * 16 * 1024

    async def write_on(stream: Stream) -> None:
        while True:
            await stream.write(piece)

    async def main() -> None:
        async with KIT.pair() as (client, accepted):
            opened = [await client.open_stream() for _ in range(16)]
            writers = [asyncio.create_task(write_on(stream)) for stream in opened]
            server = await asyncio.wait_for(accepted.get(), 10)
            for _ in opened:  # accepted, never read: the writers fill the windows
                await asyncio.wait_for(server.accept_stream(), 10)
            await asyncio.sleep(0.2)
            await client.aclose()
            ends = await asyncio.wait_for(asyncio.gather(*writers, return_exceptions=True), 10)
        assert all(isinstance(end, TransportError) for end in ends), ends

    for _ in range(10):  # the cancel must land inside a send: not every time
        asyncio.run(main())
