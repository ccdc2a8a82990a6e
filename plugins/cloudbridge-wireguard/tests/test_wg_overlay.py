"""Two namespaces joined by a veth, a WireGuard overlay in each (real wireguard-go),
driven through the plugin's hook: ping, peers changing, and nothing left behind."""

from __future__ import annotations

import base64
import socket
import subprocess
from pathlib import Path

import pytest
from wgbed import (
    SOCKETS,
    Driver,
    DriverError,
    Keys,
    Pair,
    link_exists,
    nft_table,
    peer,
    ping,
    wait_until,
    wireguard_go_serving,
)


def test_two_overlays_ping_each_other(pair: Pair) -> None:
    states = pair.connect()
    for side in "ab":
        assert states[side]["interface"] == pair.name(side)
        assert states[side]["backend"] == "wireguard-go"  # this kernel has no WireGuard
        assert 0 < states[side]["listen_port"] < 65536
    rtts = ping(pair.ns("a"), pair.OVERLAY["b"], count=5)
    print(f"overlay ping RTT over wireguard-go: {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f} ms")
    ping(pair.ns("b"), pair.OVERLAY["a"], count=1)
    ping(pair.ns("a"), pair.OVERLAY6["b"], count=1)  # IPv6 inside, alongside
    # the address carries the pool's prefix: the whole pool routes through the interface
    routes = subprocess.run(
        ["ip", "-n", pair.ns("a"), "route", "get", "100.96.200.7"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"dev {pair.name('a')}" in routes
    mtu = subprocess.run(
        ["ip", "-n", pair.ns("a"), "link", "show", pair.name("a")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mtu 1420" in mtu
    assert ",UP" in mtu


def test_a_new_endpoint_keeps_the_peer_and_its_tcp_connections(pair: Pair) -> None:
    states = pair.connect()
    a, b = pair.drivers["a"], pair.drivers["b"]
    b.call("tcp_echo", host=pair.OVERLAY["b"], port=7000)
    a.call("tcp_open", host=pair.OVERLAY["b"], port=7000)
    assert a.call("tcp_roundtrip", size=200_000)
    before = a.call("status")["peers"][pair.keys["b"].public]

    # b gets a second underlay address; a moves b's endpoint there, and its packets to
    # the old one are dropped from now on
    subprocess.run(
        ["ip", "-n", pair.ns("b"), "addr", "add", "198.18.0.3/24", "dev", "vb"], check=True
    )
    a.call(
        "peers",
        peers=[peer(pair.keys["b"], pair.OVERLAY["b"], ("198.18.0.3", states["b"]["listen_port"]))],
    )
    subprocess.run(
        ["ip", "netns", "exec", pair.ns("a"), "nft", "-f", "-"],
        input="table ip old {\n chain block {\n  type filter hook output priority 0;\n"
        "  ip daddr 198.18.0.2 meta l4proto udp drop\n }\n}\n",
        text=True,
        check=True,
    )
    assert a.call("tcp_roundtrip", size=200_000)  # the same connection
    after = a.call("status")["peers"][pair.keys["b"].public]
    assert after["endpoint"] == ["198.18.0.3", states["b"]["listen_port"]]
    # the same peer: its counters went on (a re-added peer starts from zero)
    assert after["rx_bytes"] > before["rx_bytes"] > 200_000
    assert after["last_handshake"] == before["last_handshake"]


def test_an_unrelated_update_keeps_the_endpoint_wireguard_learned(pair: Pair) -> None:
    states = {side: pair.up(side) for side in "ab"}
    a, b = pair.drivers["a"], pair.drivers["b"]
    # a is told a stale endpoint for b; b reaches a, and a's WireGuard learns b's real one
    stale = pair.peer_of("b", 9)
    a.call("peers", peers=[{**stale, "endpoint": ["198.18.0.9", 9]}])
    b.call("peers", peers=[pair.peer_of("a", states["a"]["listen_port"])])
    ping(pair.ns("b"), pair.OVERLAY["a"], count=1)
    learned = ["198.18.0.2", states["b"]["listen_port"]]
    assert a.call("status")["peers"][pair.keys["b"].public]["endpoint"] == learned
    # another peer joins: b's entry is given as before, and what a learned stays
    a.call(
        "peers",
        peers=[
            {**stale, "endpoint": ["198.18.0.9", 9]},
            peer(Keys.generate(), "100.96.0.7", None),
        ],
    )
    assert a.call("status")["peers"][pair.keys["b"].public]["endpoint"] == learned
    ping(pair.ns("a"), pair.OVERLAY["b"], count=1)


def test_update_peers_removes_the_peers_not_listed(pair: Pair) -> None:
    states = pair.connect()
    a = pair.drivers["a"]
    stranger = Keys.generate()
    b_peer = pair.peer_of("b", states["b"]["listen_port"])
    a.call("peers", peers=[b_peer, peer(stranger, "100.96.0.9", ("198.18.0.9", 51820))])
    assert set(a.call("status")["peers"]) == {pair.keys["b"].public, stranger.public}
    a.call("peers", peers=[b_peer])
    assert set(a.call("status")["peers"]) == {pair.keys["b"].public}
    ping(pair.ns("a"), pair.OVERLAY["b"], count=1)
    a.call("peers", peers=[])
    assert a.call("status")["peers"] == {}
    lost = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            pair.ns("a"),
            "ping",
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            pair.OVERLAY["b"],
        ],
        capture_output=True,
        check=False,
    )
    assert lost.returncode != 0


def test_down_leaves_nothing(pair: Pair) -> None:
    states = pair.connect()
    a, name = pair.drivers["a"], pair.name("a")
    # a fast-path peer, so that there is an nft table to remove too
    a.call("peers", peers=[pair.peer_of("b", states["b"]["listen_port"], source_port=40000)])
    assert nft_table(pair.ns("a"), name) is not None
    (pid,) = wireguard_go_serving(name)
    a.call("down")
    assert not link_exists(pair.ns("a"), name)
    assert not (SOCKETS / f"{name}.sock").exists()
    assert nft_table(pair.ns("a"), name) is None
    assert wireguard_go_serving(name) == []
    assert not (Path("/proc") / str(pid)).exists()
    a.call("down")  # idempotent
    # and it can come up again
    assert pair.up("a")["interface"] == name


def test_private_keys_never_reach_the_log(pair: Pair) -> None:
    pair.connect()
    ping(pair.ns("a"), pair.OVERLAY["b"], count=1)
    for side in "ab":
        pair.drivers[side].call("down")
        log = pair.drivers[side].output()
        assert "overlay up" in log  # the log is there, and holds...
        for keys in pair.keys.values():
            private = base64.b64decode(keys.private)
            assert keys.private not in log  # ... no private key, in any spelling
            assert private.hex() not in log


@pytest.mark.parametrize("leftover", ["killed client", "live wireguard-go", "stale socket"])
def test_up_removes_what_a_killed_run_left(pair: Pair, leftover: str) -> None:
    ns, name = pair.ns("a"), pair.name("a")
    if leftover == "killed client":
        # a run with a fast-path peer, killed with -9 before its down
        pair.up("a")
        pair.drivers["a"].call("peers", peers=[pair.peer_of("b", 51820, source_port=40000)])
        pair.drivers["a"].process.kill()
        pair.drivers["a"].process.wait()
        assert nft_table(ns, name) is not None  # what it left
        # its wireguard-go had a parent-death signal: it ended with the client
        wait_until(lambda: not wireguard_go_serving(name), what="wireguard-go to end")
    elif leftover == "live wireguard-go":
        # a wireguard-go with its interface, as a run without a parent-death signal leaves
        started = subprocess.Popen(
            ["ip", "netns", "exec", ns, "wireguard-go", "-f", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until((SOCKETS / f"{name}.sock").exists, what="wireguard-go's socket")
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "add", "table", "inet", f"cb_{name}"], check=True
        )
    else:
        # the socket file of a wireguard-go killed with -9
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(SOCKETS / f"{name}.sock"))
    pair.drivers["a"].close()  # the first driver, killed or idle: its down comes too late
    fresh = pair.drivers["a"] = Driver(ns)
    state = pair.up("a")
    assert state["interface"] == name
    assert len(wireguard_go_serving(name)) == 1
    assert nft_table(ns, name) is None
    if leftover == "live wireguard-go":
        assert started.wait(10) is not None
    states_b = pair.up("b")
    fresh.call("peers", peers=[pair.peer_of("b", states_b["listen_port"])])
    pair.drivers["b"].call("peers", peers=[pair.peer_of("a", state["listen_port"])])
    ping(ns, pair.OVERLAY["b"], count=1)


def test_an_interface_that_is_not_wireguard_is_left_alone(pair: Pair) -> None:
    ns, name = pair.ns("a"), pair.name("a")
    subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "bridge"], check=True)
    with pytest.raises(DriverError, match="is not a WireGuard interface") as caught:
        pair.up("a")
    assert caught.value.type == "OverlayFailed"
    assert link_exists(ns, name)
    assert wireguard_go_serving(name) == []
