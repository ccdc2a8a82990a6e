"""Peer sessions through raw connections to the relay's TLS port (``relay-tcp``), on
loopback through an in-process relay: each peer gets a ticket over its relay session,
connects to the TLS port with the ticket's preamble, the relay joins the two sockets and
the peers run their mutual TLS on them. The conformance kit passes on it; a relay-only
peer tunnel takes it; tickets of another tenant or pair, used twice or late, garbage or a
slow preamble are dropped with nothing spliced and the relay's TLS sessions unharmed; a
raw connection reset or a relay closing mid-transfer resets the application's
connection; a TCP connect the relay's port refuses leaves the peers on the relay stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.errors import LimitExceeded, TargetUnreachable
from cloudbridge_core.p2p import relayed
from cloudbridge_core.p2p.forward import PeerTunnel
from cloudbridge_core.p2p.manager import PeerManager
from cloudbridge_core.p2p.setup import PeerTunnelSpec
from cloudbridge_core.protocol.preamble import MAGIC, PREAMBLE_SIZE, preamble, ticket_bytes
from cloudbridge_core.relay import tickets
from cloudbridge_core.testing.conformance import run_check
from cloudbridge_core.testing.waiting import until
from relaybed import Bed, echo_server, relay_bed, run
from test_p2p_loopback import sha256_round_trip, tunnel_round_trip
from test_p2p_relayed import (
    PEER_CHECKS,
    RelayedPeerSessionKit,
    carrier,
    member,
    relayed_attempt,
    sample,
)
from test_p2p_tcp import identities, read_to_end

pytestmark = pytest.mark.timeout(90)

TICKETED = relayed.TICKETED
ON_RAW = ("derp", TICKETED)
REJECTED = "cloudbridge_relay_p2p_rejected_total"

#: the loops peers and relays run on (uvloop wherever it is installed: the relay's copy
#: relies on its transports' half-close, buffer limits and aborts)
LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio")]
if importlib.util.find_spec("uvloop") is not None:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))


def run_on(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    scenario: Callable[[Bed], Awaitable[None]],
    **server: Any,
) -> None:
    """:func:`relaybed.run` on the loop ``new_loop`` makes."""

    async def main() -> None:
        async with relay_bed(tmp_path, **server) as bed:
            await scenario(bed)

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_peer_tunnel_in_relay_only_mode_takes_raw_connections(
    tmp_path: Path, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    async def scenario(bed: Bed) -> None:
        async with (
            echo_server() as echo_port,
            member(bed, "laptop", expose=(echo_port,)) as laptop,
            member(bed, "server", expose=(echo_port,)) as server,
        ):
            await until(lambda: carrier(laptop) == ON_RAW == carrier(server), 30)
            spliced = sample(bed, "cloudbridge_relay_derp_bytes_total")
            sent, received = await sha256_round_trip(laptop, "server", echo_port, 8 << 20)
            assert sent == received
            (status,) = laptop.status()
            assert (status["path"], status["protocol"], status["endpoint"]) == (*ON_RAW, "relay")
            assert status["bytes_received"] > 8 << 20  # the payload came back on it
            assert relayed_attempt(laptop, "server")["details"]["protocol"] == TICKETED
            await tunnel_round_trip(laptop, "server", echo_port, 4 << 20)
            sent, received = await sha256_round_trip(server, "laptop", echo_port, 1 << 20)
            assert sent == received
            assert bed.relay.relay.splicer.waiting == 0  # no relay stream was spliced
            assert bed.relay.relay.streams_active == 1  # the raw splice
        # the relay copied the bytes (it counts them when the splice ends)
        await until(lambda: bed.relay.relay.streams_active == 0, 10)
        assert sample(bed, "cloudbridge_relay_derp_bytes_total") - spliced > 2 * (13 << 20)

    run_on(new_loop, tmp_path, scenario)


def test_no_ticket_past_the_members_spliced_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tickets, "MAX_SPLICED_PER_MEMBER", 1)

    async def scenario(bed: Bed) -> None:
        async with member(bed, "laptop") as laptop, member(bed, "server") as server:
            await until(lambda: carrier(laptop) == ON_RAW == carrier(server), 30)
            limited = sample(bed, REJECTED, reason="limit")
            for one, other in ((laptop, server), (server, laptop)):
                with pytest.raises(LimitExceeded, match="too many raw peer splices"):
                    await one.membership.ticket(other.membership.peer_id, 999)
            assert sample(bed, REJECTED, reason="limit") - limited == 2
            assert bed.relay.relay.tickets.outstanding == 0

    run(tmp_path, scenario)


def test_a_refused_connection_to_the_tls_port_leaves_the_peers_on_the_relay_stream(
    tmp_path: Path,
) -> None:
    """The relay names a port nothing listens on (as a firewall between a peer and the
    relay's TLS port would refuse it): both peers say they cannot take ``relay-tcp``, and
    splice relay streams instead."""

    async def scenario(bed: Bed) -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        bed.relay.relay.tickets.port = closed.getsockname()[1]
        try:
            async with (
                echo_server() as echo_port,
                member(bed, "laptop") as laptop,
                member(bed, "server", expose=(echo_port,)) as server,
            ):
                on_stream = ("derp", relayed.KIND)
                await until(lambda: carrier(laptop) == on_stream == carrier(server), 30)
                sent, received = await sha256_round_trip(laptop, "server", echo_port, 1 << 20)
                assert sent == received
        finally:
            closed.close()

    run(tmp_path, scenario)


# ---- tickets and preambles the relay drops ----


async def _raw(bed: Bed, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the relay's TLS port that sends ``data`` first."""
    port = bed.relay.listeners["tls"].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _closed_by_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The relay closes the connection without sending a byte."""
    with contextlib.suppress(ConnectionError):
        assert await reader.read(1) == b""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _ticket(manager: PeerManager, peer: PeerManager, attempt: int) -> bytes:
    issued, address = await manager.membership.ticket(peer.membership.peer_id, attempt)
    assert address == "127.0.0.1"  # where the relay session goes
    return ticket_bytes(issued.ticket)


def _nothing_spliced(bed: Bed) -> None:
    assert bed.relay.relay.streams_active == 0
    assert bed.relay.relay.tickets.outstanding == 0


async def _sessions_unharmed(bed: Bed, *managers: PeerManager) -> None:
    """Every member's TLS session to the relay still answers (a ticket request)."""
    assert bed.relay.relay.sessions_by_transport["tls"] == len(managers)
    for manager in managers:
        other = next(m for m in managers if m is not manager)
        with contextlib.suppress(TargetUnreachable):  # another tenant's: unknown, yet answered
            await manager.membership.ticket(other.membership.peer_id, 999)
    await until(lambda: bed.relay.relay.tickets.outstanding == 0, 15)


def test_tickets_of_another_tenant_or_pair_are_never_spliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer of another tenant is unknown: no ticket. Two valid tickets that do not name
    each other (another pair, another attempt) each wait for their own partner, which
    never comes, and are dropped at the deadline with nothing spliced."""
    monkeypatch.setattr(relayed, "OFFER_TIMEOUT", 0.1)  # no attempt of their own in the way

    async def scenario(bed: Bed) -> None:
        async with (
            member(bed, "laptop", relayed_stream=False) as laptop,
            member(bed, "server", relayed_stream=False) as server,
            member(bed, "printer", relayed_stream=False) as printer,
            member(bed, "rival", tenant="other", relayed_stream=False) as rival,
        ):
            await until(lambda: len(laptop.membership.peers) == 2, 10)
            unknown = sample(bed, REJECTED, reason="unknown_peer")
            for one, other in ((laptop, rival), (rival, laptop)):
                with pytest.raises(TargetUnreachable, match="no such peer"):
                    await one.membership.ticket(other.membership.peer_id, 7)
            assert sample(bed, REJECTED, reason="unknown_peer") - unknown == 2
            timeouts = sample(bed, REJECTED, reason="timeout")
            mine = await _ticket(laptop, server, 7)
            other_pair = await _ticket(printer, server, 7)
            other_attempt = await _ticket(server, laptop, 8)
            connections = [
                await _raw(bed, preamble(ticket)) for ticket in (mine, other_pair, other_attempt)
            ]
            for reader, writer in connections:
                await _closed_by_relay(reader, writer)
            assert sample(bed, REJECTED, reason="timeout") - timeouts == 3
            _nothing_spliced(bed)
            await _sessions_unharmed(bed, laptop, server, printer, rival)

    run(tmp_path, scenario, handshake_timeout="1s")


def test_reused_doubled_expired_garbage_and_slow_preambles_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tickets, "TICKET_TTL", 0.5)

    async def scenario(bed: Bed) -> None:
        async with (
            member(bed, "laptop", relayed_stream=False) as laptop,
            member(bed, "server", relayed_stream=False) as server,
        ):
            await until(lambda: len(laptop.membership.peers) == 1, 10)
            bad = sample(bed, REJECTED, reason="bad_ticket")
            # used twice: the first connection waits for its partner, the second is dropped
            ticket = await _ticket(laptop, server, 7)
            first = await _raw(bed, preamble(ticket))
            await until(lambda: bed.relay.relay.tickets.waiting == 1, 5)
            await _closed_by_relay(*await _raw(bed, preamble(ticket)))
            assert sample(bed, REJECTED, reason="bad_ticket") - bad == 1
            await _closed_by_relay(*first)  # its partner never came
            # a second ticket for an attempt whose connection already waits
            limited = sample(bed, REJECTED, reason="limit")
            one, two = await _ticket(laptop, server, 9), await _ticket(laptop, server, 9)
            first = await _raw(bed, preamble(one))
            await until(lambda: bed.relay.relay.tickets.waiting == 1, 5)
            await _closed_by_relay(*await _raw(bed, preamble(two)))
            assert sample(bed, REJECTED, reason="limit") - limited == 1
            await _closed_by_relay(*first)
            # expired before it is used
            late = await _ticket(laptop, server, 8)
            await until(lambda: bed.relay.relay.tickets.outstanding == 0, 5)
            await _closed_by_relay(*await _raw(bed, preamble(late)))
            assert sample(bed, REJECTED, reason="bad_ticket") - bad == 2
            # a made-up ticket, and garbage after the magic's first byte
            await _closed_by_relay(*await _raw(bed, preamble(os.urandom(32))))
            assert sample(bed, REJECTED, reason="bad_ticket") - bad == 3
            garbage = sample(bed, REJECTED, reason="bad_preamble")
            await _closed_by_relay(*await _raw(bed, MAGIC[:1] + os.urandom(PREAMBLE_SIZE - 1)))
            assert sample(bed, REJECTED, reason="bad_preamble") - garbage == 1
            # a preamble that never ends: dropped at the pre-auth deadline, counted there
            expired = bed.relay.relay.preauth.expired
            await _closed_by_relay(*await _raw(bed, MAGIC))
            assert bed.relay.relay.preauth.expired - expired == 1
            assert bed.relay.relay.preauth.pending == 0
            _nothing_spliced(bed)
            await _sessions_unharmed(bed, laptop, server)

    run(tmp_path, scenario, handshake_timeout="1s", preauth_timeout="1s")


# ---- abnormal ends ----


async def _endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(os.urandom(1 << 16))
            await writer.drain()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("new_loop", LOOPS)
@pytest.mark.parametrize("end", ["peer_reset", "relay_closed"])
def test_a_broken_raw_splice_resets_the_application_and_everything_is_freed(
    tmp_path: Path, end: str, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """Mid-download, the far peer's raw connection is reset (``peer_reset``), or the
    relay's TLS listener closes, taking its splices with it (``relay_closed``): the
    application sees a reset, never a clean EOF. Descriptors and tasks return to their
    baseline once the peers are gone."""

    async def scenario(bed: Bed) -> None:
        source = await asyncio.start_server(_endless, "127.0.0.1", 0)
        source_port = source.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        descriptors, tasks = _descriptors(), len(asyncio.all_tasks())
        controlling, controlled = identities()
        async with (
            member(bed, "laptop", identity=controlling) as laptop,
            member(bed, "server", expose=(source_port,), identity=controlled) as server,
        ):
            await until(lambda: carrier(laptop) == ON_RAW == carrier(server), 30)
            tunnel = PeerTunnel(PeerTunnelSpec(0, "server", source_port), laptop)
            await tunnel.start()
            application = socket.create_connection(("127.0.0.1", tunnel.port))
            application.setblocking(False)
            try:
                received = 0
                while received < 4 << 20:
                    received += len(await loop.sock_recv(application, 1 << 16))
                if end == "peer_reset":
                    carried = server.peers[laptop.membership.peer_id].session.carried_by(
                        relayed.KIND
                    )
                    assert carried is not None
                    carried[1].abort()
                else:
                    await bed.relay.listeners["tls"].aclose()
                with pytest.raises(ConnectionResetError):
                    await read_to_end(application)
            finally:
                application.close()
                await tunnel.aclose()
        source.close()
        await source.wait_closed()
        await until(lambda: _descriptors() <= descriptors and len(asyncio.all_tasks()) <= tasks, 15)

    run_on(new_loop, tmp_path, scenario)


@pytest.mark.parametrize("check", PEER_CHECKS, ids=lambda check: check.__name__)
def test_conformance_over_raw_connections(check: object) -> None:
    run_check(check, RelayedPeerSessionKit(TICKETED))  # type: ignore[arg-type]
