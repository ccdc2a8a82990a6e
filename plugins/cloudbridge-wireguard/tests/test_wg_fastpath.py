"""The fast path through real NATs (tests/natbed.py: two hosts, each behind a
port-preserving NAT): WireGuard's packets leave from and arrive on the port a Python
socket punched, and that socket still gets every datagram that is not WireGuard's."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from natbed import ROUTER, NatBed
from wgbed import Driver, Keys, needs_root_tools, nft_table, peer, ping, rule_counters, wait_until

PUNCHED = 40000  # the port each host's Python socket holds (a NAT strategy's)


@pytest.fixture
def natbed() -> Iterator[NatBed]:
    needs_root_tools()
    with NatBed() as bed:
        yield bed


def test_wireguard_shares_the_punched_port_with_the_python_socket(natbed: NatBed) -> None:
    tag = secrets.token_hex(3)
    hosts = {i: natbed.hosts[i] for i in (1, 2)}
    drivers = {i: Driver(hosts[i]) for i in (1, 2)}
    try:
        keys = {i: Keys.generate() for i in (1, 2)}
        names = {i: f"cbn{i}{tag}" for i in (1, 2)}
        # each host's Python socket punches its NAT towards the other's public address
        for i in (1, 2):
            drivers[i].call("udp_bind", port=PUNCHED)

        def punched() -> bool:
            for i, j in ((1, 2), (2, 1)):
                drivers[i].call("udp_send", host=ROUTER[j], port=PUNCHED, data=b"punch".hex())
            return all(drivers[i].call("udp_stats")["received"] for i in (1, 2))

        wait_until(punched, what="the hole punch")

        states = {i: drivers[i].up(names[i], [f"100.96.0.{i}/16"], keys[i]) for i in (1, 2)}
        for i, j in ((1, 2), (2, 1)):
            assert states[i]["listen_port"] != PUNCHED
            drivers[i].call(
                "peers",
                peers=[peer(keys[j], f"100.96.0.{j}", (ROUTER[j], PUNCHED), source_port=PUNCHED)],
            )
        # a handshake sent before the other side had its rules may have reached that
        # side's Python socket (carries() tells it apart); from here on none may
        before = {i: drivers[i].call("udp_stats") for i in (1, 2)}

        rtts = ping(hosts[1], "100.96.0.2", count=5)
        ping(hosts[2], "100.96.0.1", count=2)
        print(f"overlay ping RTT through two NATs on the fast path: {min(rtts):.3f} ms")

        # the socket's own datagrams (a QUIC short header, a STUN request) still reach it
        quic, stun = bytes([0x43]) + b"quic" * 10, bytes.fromhex("000100002112a442") + bytes(12)
        for i, j in ((1, 2), (2, 1)):
            for datagram in (quic, stun):
                drivers[i].call("udp_send", host=ROUTER[j], port=PUNCHED, data=datagram.hex())
        for i in (1, 2):
            wait_until(
                lambda i=i: drivers[i].call("udp_stats")["received"] >= before[i]["received"] + 2,
                what="the socket's own datagrams",
            )
            after = drivers[i].call("udp_stats")
            assert {quic.hex(), stun.hex()} <= set(after["payloads"])
            assert after["wireguard"] == before[i]["wireguard"]  # no WireGuard packet on it

            # WireGuard's packets took the rewrites both ways...
            counted = rule_counters(nft_table(hosts[i], names[i]) or {"nftables": []})
            assert counted["leaving"] >= 5, counted
            assert counted["arriving"] >= 5, counted
            # ... so the peer sees them come from the punched mapping, not another one
            j = 3 - i
            (seen,) = drivers[j].call("status")["peers"].values()
            assert seen["endpoint"] == [ROUTER[i], PUNCHED]
            assert seen["rx_bytes"] > 0
    finally:
        for driver in drivers.values():
            driver.close()


def test_the_rules_follow_the_peers(natbed: NatBed) -> None:
    """Rebuilt on every change, gone with the last fast-path peer and with down."""
    host, name = natbed.hosts[1], f"cbr{secrets.token_hex(3)}"
    driver = Driver(host)
    try:
        state = driver.up(name, ["100.96.0.1/16"], Keys.generate())
        other = Keys.generate()
        fast = peer(other, "100.96.0.2", (ROUTER[2], PUNCHED), source_port=PUNCHED)
        driver.call("peers", peers=[fast])
        rules = str(nft_table(host, name))
        assert ROUTER[2] in rules
        assert str(state["listen_port"]) in rules
        moved = {**fast, "endpoint": [ROUTER[2], PUNCHED + 1]}
        driver.call("peers", peers=[moved])
        rules = str(nft_table(host, name))
        assert str(PUNCHED + 1) in rules
        driver.call("peers", peers=[{**moved, "source_port": None}])  # a relayed path now
        assert nft_table(host, name) is None
        driver.call("peers", peers=[fast])
        driver.call("down")
        assert nft_table(host, name) is None
    finally:
        driver.close()


def test_no_packet_leaves_from_the_wrong_port(natbed: NatBed) -> None:
    """wireguard-go sends a handshake as soon as a peer with a keepalive is set; the
    table is written before the peer, so even that first packet leaves from the punched
    port: the NAT never maps the overlay's own port."""
    host, name = natbed.hosts[1], f"cbf{secrets.token_hex(3)}"
    driver = Driver(host)
    try:
        state = driver.up(name, ["100.96.0.1/16"], Keys.generate())
        driver.call(
            "peers",
            peers=[peer(Keys.generate(), "100.96.0.2", (ROUTER[2], PUNCHED), source_port=PUNCHED)],
        )
        wait_until(
            lambda: rule_counters(nft_table(host, name) or {"nftables": []}).get("leaving", 0) > 0,
            what="the first handshake through the rewrite",
        )
        mappings = natbed.exec(natbed.routers[1], ["conntrack", "-L", "-p", "udp"])
        assert f"sport={PUNCHED} dport={PUNCHED}" in mappings
        assert f"sport={state['listen_port']} " not in mappings
    finally:
        driver.close()
