"""The overlay's parts in the core that need no overlay plugin: the route check, the
name responder (real UDP on loopback) and the interface name."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from cloudbridge_core.errors import OverlayFailed
from cloudbridge_core.overlay.names import NameResponder, label
from cloudbridge_core.overlay.routes import conflicting_route, local_routes, routed_through
from cloudbridge_core.overlay.run import OverlayRun, interface_name
from cloudbridge_core.overlay.tcp import TcpStream
from cloudbridge_core.p2p.channel import without_overlay
from cloudbridge_core.providers import OverlayInterface, OverlayState

# /proc/net/route as Linux writes it: addresses and masks in little-endian hex
ROUTE_TABLE = """\
Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
tailscale0\t00004064\t00000000\t0001\t0\t0\t0\t0000C0FF\t0\t0\t0
cb1234abcd\t0000630A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_a_pool_over_another_interfaces_route_is_named(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(ROUTE_TABLE)
    assert conflicting_route(ipaddress.IPv4Network("100.64.0.0/10"), "cb0", table) == (
        "100.64.0.0/10 dev tailscale0"
    )
    # inside the pool too, and a pool inside a route
    assert conflicting_route(ipaddress.IPv4Network("192.0.2.128/25"), "cb0", table) == (
        "192.0.2.0/24 dev eth0"
    )


def test_the_default_route_and_the_overlays_own_route_are_no_conflict(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(ROUTE_TABLE)
    assert ipaddress.IPv4Network("0.0.0.0/0") not in [n for n, _ in local_routes(table)]
    assert conflicting_route(ipaddress.IPv4Network("10.99.0.0/16"), "cb1234abcd", table) is None
    assert conflicting_route(ipaddress.IPv4Network("172.16.0.0/12"), "cb0", table) is None


def test_a_missing_route_table_checks_nothing(tmp_path: Path) -> None:
    assert local_routes(tmp_path / "absent") == []


def test_interface_names_fit_ifnamsiz_and_differ_per_tenant_and_device() -> None:
    names = {interface_name(t, d) for t in ("acme", "globex") for d in ("p1", "p2")}
    assert len(names) == 4
    assert all(len(n) <= 15 and n.startswith("cb") for n in names)
    assert interface_name("acme", "p1") == interface_name("acme", "p1")


def test_labels_are_dns_safe() -> None:
    assert label("Laptop_Of.Ann") == "laptop-of-ann"
    assert label("x" * 80) == "x" * 63


def test_the_responder_answers_peers_by_name_and_nothing_else() -> None:
    asyncio.run(_the_responder_answers_peers_by_name_and_nothing_else())


async def _the_responder_answers_peers_by_name_and_nothing_else() -> None:
    names = {"server.acme.cloudbridge.internal": "100.64.0.7"}
    responder = await NameResponder.serve(
        "127.0.0.1", "acme.cloudbridge.internal", lambda: names, 0
    )
    port = responder._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    try:

        async def ask(name: str) -> dns.message.Message:
            query = dns.message.make_query(name, dns.rdatatype.A)
            return await dns.asyncquery.udp(query, "127.0.0.1", timeout=2, port=port)

        found = await ask("Server.acme.cloudbridge.internal")
        assert found.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for r in found.answer[0]] == ["100.64.0.7"]
        assert (await ask("laptop.acme.cloudbridge.internal")).rcode() == dns.rcode.NXDOMAIN
        assert (await ask("example.com")).rcode() == dns.rcode.REFUSED
        # what is not a DNS query gets no answer at all
        assert responder.answer(b"\x00garbage") is None
    finally:
        responder.close()
        await asyncio.sleep(0)


class _BrokenOverlay:
    """A plugin that fails with a library's exception: what the core must not let through
    (a stand-in on purpose: the core's boundary is what is under test)."""

    downed = False

    async def up(self, interface: OverlayInterface) -> OverlayState:
        raise ValueError("cannot open a UDP handle, invalid family 16")

    async def update_peers(self, peers: object) -> None:
        raise AssertionError("never up")

    def carries(self, datagram: bytes) -> bool:
        return False

    async def down(self) -> None:
        self.downed = True


def test_a_plugins_own_exception_reaches_the_user_as_overlay_failed() -> None:
    membership = SimpleNamespace(
        overlay={"address": "100.77.0.2", "pool": "100.77.0.0/16"}, peer_id="p1", name="laptop"
    )
    mesh = SimpleNamespace(membership=membership, peers={})
    settings = SimpleNamespace(
        interface=None, mtu=1420, dns=False, allow=(), type="example", domain="x.internal"
    )
    broken = _BrokenOverlay()
    run = OverlayRun(settings, broken, mesh, "private", "acme")  # type: ignore[arg-type]
    with pytest.raises(OverlayFailed, match="example overlay failed in up: cannot open"):
        asyncio.run(run.start())
    assert broken.downed  # what a half-done up created is taken down


def test_an_address_is_routed_through_the_most_specific_route(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(ROUTE_TABLE)
    assert routed_through("100.64.1.2", table) == "tailscale0"
    assert routed_through("10.99.3.4", table) == "cb1234abcd"
    assert routed_through("8.8.8.8", table) is None  # the default route only


def test_a_tcp_stream_keeps_eof_and_reset_apart() -> None:
    asyncio.run(_a_tcp_stream_keeps_eof_and_reset_apart())


async def _a_tcp_stream_keeps_eof_and_reset_apart() -> None:
    ends: asyncio.Queue[bytes | str] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ends.put_nowait(await reader.read())
        except ConnectionResetError:
            ends.put_nowait("reset")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()
    async with server:
        finished = await TcpStream.connect(address, 2)
        await finished.write(b"all of it")
        await finished.close_write()
        assert await ends.get() == b"all of it"
        assert await finished.read() == b""  # the server closed: an EOF
        await finished.aclose()
        broken = await TcpStream.connect(address, 2)
        await broken.write(b"part")
        await asyncio.sleep(0.05)
        await broken.reset()
        assert await ends.get() == "reset"


def test_paths_to_peers_never_run_through_the_overlay() -> None:
    message = {
        "ufrag": "u",
        "candidates": [
            "candidate:1 1 udp 2130706431 198.18.10.2 40000 typ host",
            "candidate:2 1 udp 2130706431 100.64.0.1 40001 typ host",
        ],
        "endpoints": ["198.18.10.2:5000", "100.64.0.1:5000", "[fd00::1]:5000"],
    }
    kept = without_overlay(message, {"100.64.0.1"})
    assert kept["candidates"] == ["candidate:1 1 udp 2130706431 198.18.10.2 40000 typ host"]
    assert kept["endpoints"] == ["198.18.10.2:5000", "[fd00::1]:5000"]
    assert kept["ufrag"] == "u"
    assert without_overlay(message, set()) == message
