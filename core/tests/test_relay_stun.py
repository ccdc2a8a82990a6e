"""The relay's STUN responder on loopback, asked by aioice's own STUN message code."""

from __future__ import annotations

import asyncio
import socket

from aioice import stun
from cloudbridge_core.relay.stun import serve_stun
from prometheus_client import CollectorRegistry, Counter


def test_a_binding_request_gets_the_address_it_came_from() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        answered = Counter("answered", "STUN answers.", registry=registry)
        transport = await serve_stun("127.0.0.1", 0, answered)
        port = transport.get_extra_info("sockname")[1]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            client.bind(("127.0.0.1", 0))
            await loop.sock_sendto(client, b"not stun at all", ("127.0.0.1", port))
            request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            await loop.sock_sendto(client, bytes(request), ("127.0.0.1", port))
            reply = stun.parse_message(await asyncio.wait_for(loop.sock_recv(client, 2048), 5))
            assert reply.transaction_id == request.transaction_id
            assert reply.message_class == stun.Class.RESPONSE
            assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.getsockname()
        transport.close()
        assert registry.get_sample_value("answered_total") == 1  # the garbage got nothing

    asyncio.run(main())
