"""What the overlay says when it cannot come up: every failure an OverlayFailed that
names what is missing, and nothing left behind."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from wgbed import SOCKETS, Driver, DriverError, Pair, link_exists, ping, wireguard_go_serving


def kernel_has_wireguard(pair: Pair) -> bool:
    probe = f"cbk{pair.tag}"
    made = subprocess.run(
        ["ip", "-n", pair.ns("a"), "link", "add", probe, "type", "wireguard"],
        capture_output=True,
        check=False,
    )
    if made.returncode == 0:
        subprocess.run(["ip", "-n", pair.ns("a"), "link", "del", probe], check=True)
    return made.returncode == 0


def assert_nothing_made(pair: Pair, side: str = "a") -> None:
    name = pair.name(side)
    assert not link_exists(pair.ns(side), name)
    assert not (SOCKETS / f"{name}.sock").exists()
    assert wireguard_go_serving(name) == []


def test_without_cap_net_admin_the_error_says_so(pair: Pair) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop the capability")
    pair.drivers["a"].close()
    pair.drivers["a"] = Driver(
        pair.ns("a"), prefix=["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--"]
    )
    with pytest.raises(DriverError) as caught:
        pair.up("a")
    assert (caught.value.type, caught.value.code) == ("OverlayFailed", "overlay_failed")
    assert "needs CAP_NET_ADMIN" in caught.value.message
    assert "the mesh keeps running without the overlay" in caught.value.message
    assert_nothing_made(pair)


def test_without_wireguard_go_the_error_names_the_package(pair: Pair) -> None:
    if kernel_has_wireguard(pair):
        pytest.skip("this kernel has WireGuard: auto never needs wireguard-go")
    pair.drivers["a"].close()
    # wireguard-go is in /usr/bin, nft and ip in /usr/sbin
    pair.drivers["a"] = Driver(pair.ns("a"), env={"PATH": "/usr/sbin:/sbin"})
    with pytest.raises(DriverError) as caught:
        pair.up("a")
    assert caught.value.type == "OverlayFailed"
    assert "apt install wireguard-go" in caught.value.message
    assert_nothing_made(pair)


def test_the_kernel_backend_where_the_kernel_has_none(pair: Pair) -> None:
    if kernel_has_wireguard(pair):
        pytest.skip("this kernel has WireGuard")
    with pytest.raises(DriverError) as caught:
        pair.up("a", backend="kernel")
    assert caught.value.type == "OverlayFailed"
    assert "kernel WireGuard is not available" in caught.value.message
    assert "overlay.wireguard.backend" in caught.value.message
    assert_nothing_made(pair)


def test_the_kernel_backend(pair: Pair) -> None:
    if not kernel_has_wireguard(pair):
        pytest.skip(
            "this kernel has no WireGuard (CONFIG_WIREGUARD is not set, and it cannot load "
            "modules): the kernel backend cannot run here"
        )
    states = {side: pair.up(side, backend="kernel") for side in "ab"}
    assert {state["backend"] for state in states.values()} == {"kernel"}
    for side, other in (("a", "b"), ("b", "a")):
        pair.drivers[side].call("peers", peers=[pair.peer_of(other, states[other]["listen_port"])])
    ping(pair.ns("a"), pair.OVERLAY["b"], count=2)
    pair.drivers["a"].call("down")
    assert not link_exists(pair.ns("a"), pair.name("a"))


def test_a_listen_port_in_use_is_named(pair: Pair) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        pair.drivers["a"].call("udp_bind", port=port)  # the port is taken in a's namespace
    with pytest.raises(DriverError) as caught:
        pair.up("a", listen_port=port)
    assert f"UDP port {port} is in use" in caught.value.message
    assert_nothing_made(pair)
    assert pair.up("a")["listen_port"] != port  # the next up (with any port) works
