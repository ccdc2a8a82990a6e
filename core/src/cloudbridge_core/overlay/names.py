"""Peers by name: a small DNS responder on this device's overlay address that answers
``<peer>.<tenant>.<domain>`` with the peer's overlay address (dnspython parses and builds
the messages). Names outside that zone are refused: it is no resolver for anything else.
Every query comes from a peer of the tenant (the inbound filter), yet it is parsed with a
size bound and answered or dropped, never logged verbatim."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from cloudbridge_core.log import get_logger

log = get_logger("overlay.dns")

PORT = 53
TTL = 30
#: a DNS query over UDP fits in 512 bytes unless EDNS says more; nothing sent here needs more
MAX_QUERY = 1232


def label(text: str) -> str:
    """``text`` as one DNS label: lower case, anything but letters, digits and hyphens
    as a hyphen, at most 63 characters."""
    return re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:63] or "-"


class NameResponder(asyncio.DatagramProtocol):
    """Answers for the names ``names()`` maps (lower-case name without the trailing dot
    -> IPv4 address) under ``zone``."""

    def __init__(self, zone: str, names: Callable[[], Mapping[str, str]]) -> None:
        self._zone = dns.name.from_text(zone)
        self._names = names
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def serve(
        cls, address: str, zone: str, names: Callable[[], Mapping[str, str]], port: int = PORT
    ) -> NameResponder:
        loop = asyncio.get_running_loop()
        _, responder = await loop.create_datagram_endpoint(
            lambda: cls(zone, names), local_addr=(address, port)
        )
        return responder

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is None or len(data) > MAX_QUERY:
            return
        answer = self.answer(data)
        if answer is not None:
            self._transport.sendto(answer, addr)

    def answer(self, query_bytes: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(query_bytes)
        except (dns.exception.DNSException, ValueError):
            return None  # not DNS: nothing to answer
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        response = dns.message.make_response(query)
        question = query.question[0]
        if not question.name.is_subdomain(self._zone):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        response.flags |= dns.flags.AA
        address = self._names().get(question.name.to_text(omit_final_dot=True).lower())
        if address is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            response.answer.append(
                dns.rrset.from_text(question.name, TTL, dns.rdataclass.IN, dns.rdatatype.A, address)
            )
        return response.to_wire()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
