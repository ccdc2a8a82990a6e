"""The relay answers STUN binding requests (``server.stun_port``, UDP), so a client learns
its public address from the relay it already trusts, with no STUN server of its own."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aioice import stun
from prometheus_client import Counter

from cloudbridge_core.log import get_logger

log = get_logger("relay.stun")


class StunResponder(asyncio.DatagramProtocol):
    def __init__(self, answered: Counter) -> None:
        self._answered = answered
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            request = stun.parse_message(data)
        except ValueError:
            return  # not STUN: nothing to answer, nothing to amplify
        if (request.message_method, request.message_class) != (
            stun.Method.BINDING,
            stun.Class.REQUEST,
        ):
            return
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        response.add_fingerprint()
        assert self._transport is not None
        self._transport.sendto(bytes(response), addr)
        self._answered.inc()


async def serve_stun(host: str, port: int, answered: Counter) -> asyncio.DatagramTransport:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: StunResponder(answered), local_addr=(host, port)
    )
    return transport
