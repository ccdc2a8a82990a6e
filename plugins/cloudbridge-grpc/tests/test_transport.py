"""gRPC specifics on real loopback sockets: discovery, health service, the .proto."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.testing.conformance import TransportKit
from cloudbridge_core.testing.streams import echo_streams, read_all
from cloudbridge_grpc._generated import tunnel_pb2
from cloudbridge_grpc.transport import SERVICE, GrpcTransport
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.timeout(60)
KIT = TransportKit(lambda: GrpcTransport({}))


def test_discovered_between_quic_and_websocket() -> None:
    plugins = load_plugins()
    [record] = [r for r in plugins.records if r.name == "grpc"]
    assert record.status == "active"
    assert record.providers == {"transport": ["grpc"]}
    order = list(plugins.providers("transport"))
    assert order.index("grpc") == order.index("websocket") - 1


def test_the_standard_health_service_answers_serving() -> None:
    async def main() -> None:
        listener = await GrpcTransport({}).serve(KIT.server_endpoint(), echo_streams)
        material = KIT.client_endpoint(listener.port).material
        assert material is not None
        credentials = grpc.ssl_channel_credentials(root_certificates=material.ca)
        async with grpc.aio.secure_channel(f"127.0.0.1:{listener.port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await listener.aclose()

    asyncio.run(main())


def test_writes_larger_than_a_message_are_split() -> None:
    async def main() -> None:
        transport = GrpcTransport({"max_message_bytes": 65536})
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


def test_the_proto_declares_the_two_streaming_calls() -> None:
    service = tunnel_pb2.DESCRIPTOR.services_by_name["Tunnel"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Session": (True, True), "Stream": (True, True)}
    assert tunnel_pb2.DESCRIPTOR.package == "cloudbridge.v1"
