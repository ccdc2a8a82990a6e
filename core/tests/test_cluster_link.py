"""Relay-to-relay links on real loopback sockets: members carry packets both ways, and
nothing that is not a member of the cluster gets a packet in."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from cloudbridge_core import tlsutil
from cloudbridge_core.relay.cluster.link import (
    ACCEPTED,
    LINK_ALPN,
    LinkIdentity,
    LinkMetrics,
    LinkPool,
    LinkServer,
)
from cloudbridge_core.relay.cluster.link_frames import (
    MAX_PAYLOAD,
    LinkPacket,
    PacketReader,
    encode_packet,
)
from cloudbridge_core.retry import Backoff
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.timeout(60)

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio")]
if importlib.util.find_spec("uvloop") is not None:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))

CA = tlsutil.generate_ca("CloudBridge test cluster CA")
OTHER_CA = tlsutil.generate_ca("Another cluster's CA")
ALICE, BOB = os.urandom(32), os.urandom(32)
#: a short wait between tries, for tests that wait on a condition
FAST = Backoff(initial_delay=0.02, multiplier=2.0, max_delay=0.1, jitter=0.0, max_retries=0)
#: how long a bounded wait lasts before the test fails
WAIT = 20.0


@dataclass
class Inbox:
    """What a member's ``deliver`` was given, in order."""

    packets: list[LinkPacket] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def deliver(self, tenant_id: str, sender: bytes, target: bytes, payload: bytes) -> bool:
        self.packets.append(LinkPacket(tenant_id, sender, target, payload))
        self.changed.set()
        return True

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.packets) < count:
                self.changed.clear()
                await self.changed.wait()


def run(
    main: Callable[[], Awaitable[None]], new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())


@contextlib.asynccontextmanager
async def member(
    name: str, deliver: Callable[[str, bytes, bytes, bytes], Awaitable[bool]], **options: float
) -> AsyncIterator[LinkServer]:
    server = await LinkServer.start(
        "127.0.0.1", 0, LinkIdentity.issue(CA, name), deliver, **options
    )
    try:
        yield server
    finally:
        await server.aclose()


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - links signal none of these
            await asyncio.sleep(0.01)


async def send_all(pool: LinkPool, name: str, address: str, packets: list[LinkPacket]) -> None:
    """Send every packet in order, trying a dropped one again (the link may be opening)."""
    async with asyncio.timeout(WAIT):
        for packet in packets:
            while not send(pool, name, address, packet):  # noqa: ASYNC110 - no event says when
                await asyncio.sleep(0.005)


def send(pool: LinkPool, name: str, address: str, packet: LinkPacket) -> bool:
    return pool.send(
        name, address, packet.tenant_id, packet.sender_key, packet.target_key, packet.payload
    )


def sample(rng: int, count: int, sender: bytes, target: bytes) -> list[LinkPacket]:
    """Packets of every size a link carries: empty, one byte, WireGuard's, and (one in a
    hundred: the test keeps every packet twice) the largest."""

    def size(i: int) -> int:
        return MAX_PAYLOAD if i % 100 == 3 else (0, 1, 1420)[i % 3]

    return [
        LinkPacket(
            f"tenant-{(rng + i) % 3}",
            sender,
            target,
            (i.to_bytes(4, "big") * (size(i) // 4 + 1))[: size(i)],
        )
        for i in range(count)
    ]


def metric(registry: CollectorRegistry, direction: str) -> float:
    value = registry.get_sample_value(
        "cloudbridge_relay_cluster_link_bytes_total", {"direction": direction}
    )
    assert value is not None
    return value


async def answer_to(port: int, presented: tlsutil.KeyPair) -> bytes:
    """Dial the link server presenting ``presented``, send a packet, and return the
    server's first answer: ``ACCEPTED`` if it took us for a member, else nothing."""
    context = LinkIdentity("tester", CA.certificate, presented).client_context()
    answer = b""
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=tlsutil.MEMBER_SAN
        )
        writer.write(encode_packet("acme", ALICE, BOB, b"let me in"))
        async with asyncio.timeout(WAIT):
            answer = await reader.read(1)
        writer.close()
    return answer


@dataclass
class Impostor:
    """A TLS server on the link port presenting a certificate of its choice, which takes
    any dialer and says ``ACCEPTED``: it records what a pool then sends it."""

    received: bytearray = field(default_factory=bytearray)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def impostor(presented: tlsutil.KeyPair) -> AsyncIterator[tuple[Impostor, str]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols([LINK_ALPN])
    tlsutil.load_key_pair(context, presented)
    seen = Impostor()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(context)
            writer.write(ACCEPTED)
            while data := await reader.read(1 << 16):
                seen.received += data
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            seen.ended.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield seen, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("new_loop", LOOPS)
def test_two_members_exchange_thousands_of_packets_both_ways_in_order(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        inbox_a, inbox_b = Inbox(), Inbox()
        registry_a, registry_b = CollectorRegistry(), CollectorRegistry()
        metrics_a, metrics_b = LinkMetrics(registry_a), LinkMetrics(registry_b)
        async with (
            member("relay-a", inbox_a.deliver, metrics=metrics_a) as server_a,
            member("relay-b", inbox_b.deliver, metrics=metrics_b) as server_b,
        ):
            pool_a = LinkPool(LinkIdentity.issue(CA, "relay-a"), metrics=metrics_a)
            pool_b = LinkPool(LinkIdentity.issue(CA, "relay-b"), metrics=metrics_b)
            to_b, to_a = sample(0, 3000, ALICE, BOB), sample(1, 3000, BOB, ALICE)
            await asyncio.gather(
                send_all(pool_a, "relay-b", f"127.0.0.1:{server_b.port}", to_b),
                send_all(pool_b, "relay-a", f"127.0.0.1:{server_a.port}", to_a),
            )
            await inbox_b.wait_for(len(to_b))
            await inbox_a.wait_for(len(to_a))
            assert inbox_b.packets == to_b
            assert inbox_a.packets == to_a
            assert pool_a.connected() == ["relay-b"]
            assert server_b.members() == ["relay-a"]
            # each side counts what it put on its link, and what it read from the other's
            assert metric(registry_a, "sent") == metric(registry_b, "received") > 3000 * 70
            assert metric(registry_b, "sent") == metric(registry_a, "received")
            await pool_a.aclose()
            await pool_b.aclose()
            assert not pool_a.send("relay-b", f"127.0.0.1:{server_b.port}", "acme", ALICE, BOB, b"")

    run(main, new_loop)


def test_a_certificate_from_another_ca_is_refused_both_ways() -> None:
    async def main() -> None:
        inbox = Inbox()
        async with member("relay-b", inbox.deliver) as server:
            stranger = tlsutil.issue_member_certificate(OTHER_CA, "relay-x")
            assert await answer_to(server.port, stranger) == b""
        assert inbox.packets == []
        # and a pool does not take another cluster's member for one of its own
        pool = LinkPool(LinkIdentity.issue(CA, "relay-a"))
        async with impostor(stranger) as (seen, address):
            assert pool.send("relay-x", address, "acme", ALICE, BOB, b"for members only")
            async with asyncio.timeout(WAIT):
                await seen.ended.wait()
        assert seen.received == b""
        assert pool.connected() == []
        await pool.aclose()

    run(main, asyncio.new_event_loop)


@pytest.mark.parametrize("client_auth", [False, True], ids=["server-only", "client-auth"])
def test_the_relays_ordinary_server_certificate_is_not_a_member(client_auth: bool) -> None:
    async def main() -> None:
        inbox = Inbox()
        # even with the member name in it: what makes a member is the marking
        ordinary = tlsutil.issue_server_certificate(
            CA, ["relay.example", tlsutil.MEMBER_SAN], client_auth=client_auth
        )
        async with member("relay-b", inbox.deliver) as server:
            assert await answer_to(server.port, ordinary) == b""
            # while a member's certificate from the same CA is taken
            member_certificate = tlsutil.issue_member_certificate(CA, "relay-c")
            assert await answer_to(server.port, member_certificate) == ACCEPTED
            await inbox.wait_for(1)
        assert [packet.payload for packet in inbox.packets] == [b"let me in"]
        pool = LinkPool(LinkIdentity.issue(CA, "relay-a"))
        async with impostor(ordinary) as (seen, address):
            assert pool.send("relay-b", address, "acme", ALICE, BOB, b"for members only")
            async with asyncio.timeout(WAIT):
                await seen.ended.wait()
        assert seen.received == b""
        await pool.aclose()

    run(main, asyncio.new_event_loop)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (EOF or reset) within the bounded wait."""
    try:
        async with asyncio.timeout(WAIT):
            return await reader.read() == b""
    except ConnectionError:
        return True


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_connection_that_never_completes_the_handshake_is_closed_at_the_deadline(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        inbox = Inbox()
        async with member("relay-b", inbox.deliver, handshake_timeout=0.2) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\x16\x03\x01")  # the start of a ClientHello, and no more
            assert await closed_by_server(reader)
            writer.close()
        assert inbox.packets == []

    run(main, new_loop)


def test_connections_beyond_the_unauthenticated_cap_are_closed_at_once() -> None:
    async def main() -> None:
        # the deadline outlasts the test: only the cap can close the third connection
        async with member(
            "relay-b", Inbox().deliver, handshake_timeout=3600, max_unauthenticated=2
        ) as server:
            waiting = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            try:
                reader, third = await asyncio.open_connection("127.0.0.1", server.port)
            except ConnectionResetError:  # closed before the connect call even returned
                refused = True
            else:
                refused = await closed_by_server(reader)
                third.close()
            assert refused
            for _, writer in waiting:
                writer.close()

    run(main, asyncio.new_event_loop)


def oversized() -> bytes:
    return struct.pack("!IB", 1 + 4 + 64 + MAX_PAYLOAD + 1, 4) + b"acme"


def bad_tenant() -> bytes:
    return encode_packet("acme", ALICE, BOB, b"x").replace(b"acme", b"AC/E")


def no_tenant() -> bytes:
    return struct.pack("!IB", 1 + 64, 0) + ALICE + BOB


@pytest.mark.parametrize("malformed", [oversized, bad_tenant, no_tenant])
def test_a_malformed_frame_closes_the_link(malformed: Callable[[], bytes]) -> None:
    async def main() -> None:
        inbox = Inbox()
        async with member("relay-b", inbox.deliver) as server:
            identity = LinkIdentity.issue(CA, "relay-a")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                server.port,
                ssl=identity.client_context(),
                server_hostname=tlsutil.MEMBER_SAN,
            )
            assert await reader.readexactly(1) == ACCEPTED
            writer.write(encode_packet("acme", ALICE, BOB, b"before"))
            writer.write(malformed())
            writer.write(encode_packet("acme", ALICE, BOB, b"after"))
            assert await closed_by_server(reader)
            writer.close()
            await wait_until(lambda: server.members() == [])
        assert [packet.payload for packet in inbox.packets] == [b"before"]

    run(main, asyncio.new_event_loop)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_member_that_stops_reading_never_blocks_send(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        stuck = asyncio.Event()
        delivered = 0

        async def deliver_never(tenant: str, sender: bytes, target: bytes, payload: bytes) -> bool:
            nonlocal delivered
            delivered += 1
            await stuck.wait()  # a relay whose devices take nothing: it stops reading
            return True

        async with member("relay-b", deliver_never) as server:
            registry = CollectorRegistry()
            pool = LinkPool(
                LinkIdentity.issue(CA, "relay-a"),
                queue_bytes=256 * 1024,
                metrics=LinkMetrics(registry),
            )
            address = f"127.0.0.1:{server.port}"
            payload = os.urandom(1400)
            await send_all(pool, "relay-b", address, [LinkPacket("acme", ALICE, BOB, payload)])
            await wait_until(lambda: delivered == 1)
            # far more than any socket buffers hold: send must start dropping well before
            for attempt in range(200_000):
                if not pool.send("relay-b", address, "acme", ALICE, BOB, payload):
                    break
                if attempt % 64 == 0:
                    await asyncio.sleep(0)  # the loop flushes the batch to the socket
            else:
                pytest.fail("send never dropped a packet for a member that stopped reading")
            # what an operator sees of it
            dropped = "cloudbridge_relay_cluster_link_packets_dropped_total"
            assert (registry.get_sample_value(dropped) or 0) >= 1
            assert pool.connected() == ["relay-b"]
            stuck.set()
            await pool.aclose()

    run(main, new_loop)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_the_pool_links_again_to_a_member_that_restarted(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        pool = LinkPool(LinkIdentity.issue(CA, "relay-a"), backoff=FAST)
        before, after = Inbox(), Inbox()
        async with member("relay-b", before.deliver) as server:
            port = server.port
            address = f"127.0.0.1:{port}"
            await send_all(pool, "relay-b", address, [LinkPacket("acme", ALICE, BOB, b"one")])
            await before.wait_for(1)
        identity = LinkIdentity.issue(CA, "relay-b")
        restarted = await LinkServer.start("127.0.0.1", port, identity, after.deliver)
        try:
            # packets sent while the link is down are dropped: send until one gets through
            async with asyncio.timeout(WAIT):
                while not after.packets:
                    pool.send("relay-b", address, "acme", ALICE, BOB, b"two")
                    await asyncio.sleep(0.01)
            assert after.packets[0] == LinkPacket("acme", ALICE, BOB, b"two")
            assert pool.connected() == ["relay-b"]
            pool.forget("relay-b")
            assert pool.connected() == []
            await wait_until(lambda: restarted.members() == [])
        finally:
            await pool.aclose()
            await restarted.aclose()
        assert [packet.payload for packet in before.packets] == [b"one"]

    run(main, new_loop)


def test_a_server_on_no_host_in_particular_takes_links_on_every_address() -> None:
    async def main() -> None:
        inbox = Inbox()
        identity = LinkIdentity.issue(CA, "relay-b")
        server = await LinkServer.start("", 0, identity, inbox.deliver)
        pool = LinkPool(LinkIdentity.issue(CA, "relay-a"))
        try:
            hosts = ["127.0.0.1", "[::1]"] if socket.has_dualstack_ipv6() else ["127.0.0.1"]
            for host in hosts:
                packet = LinkPacket("acme", ALICE, BOB, host.encode())
                await send_all(pool, f"relay-b via {host}", f"{host}:{server.port}", [packet])
            await inbox.wait_for(len(hosts))
        finally:
            await pool.aclose()
            await server.aclose()
        assert [packet.payload for packet in inbox.packets] == [h.encode() for h in hosts]

    run(main, asyncio.new_event_loop)


@given(
    packets=st.lists(
        st.builds(
            LinkPacket,
            st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True),
            st.binary(min_size=32, max_size=32),
            st.binary(min_size=32, max_size=32),
            st.binary(max_size=2000),
        ),
        max_size=20,
    ),
    chunk=st.integers(min_value=1, max_value=4096),
)
def test_frames_decode_to_what_was_encoded_however_the_bytes_are_split(
    packets: list[LinkPacket], chunk: int
) -> None:
    stream = b"".join(
        encode_packet(p.tenant_id, p.sender_key, p.target_key, p.payload) for p in packets
    )
    reader = PacketReader()
    decoded = [
        packet
        for start in range(0, len(stream), chunk)
        for packet in reader.feed(stream[start : start + chunk])
    ]
    assert decoded == packets


def test_a_packet_no_member_would_take_is_refused_before_it_is_sent() -> None:
    with pytest.raises(ValueError, match="payload"):
        encode_packet("acme", ALICE, BOB, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="tenant"):
        encode_packet("Not A Tenant", ALICE, BOB, b"")
    with pytest.raises(ValueError, match="key"):
        encode_packet("acme", ALICE[:31], BOB, b"")
