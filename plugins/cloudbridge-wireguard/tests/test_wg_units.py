"""What the plugin decides without touching the system: names, keys, the WireGuard
message pattern, UAPI text, nftables rules, the hook and its config section."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import sys

import jsonschema
import pytest
from cloudbridge_core.api import OverlayFailed, OverlayInterface, OverlayPeer
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_wireguard import fastpath, uapi
from cloudbridge_wireguard.hooks import SETTINGS_SCHEMA, cloudbridge_overlays
from cloudbridge_wireguard.overlay import WireGuardOverlay
from cloudbridge_wireguard.wire import check_interface_name, decode_key, is_wireguard_message
from hypothesis import given
from hypothesis import strategies as st

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(1, 33))).decode()


# ---- the WireGuard message pattern -------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_wireguard_messages_are_carried(kind: int) -> None:
    assert is_wireguard_message(bytes([kind, 0, 0, 0]) + bytes(28))
    assert WireGuardOverlay().carries(bytes([kind, 0, 0, 0]) + bytes(144))


@pytest.mark.parametrize(
    "datagram",
    [
        bytes([0, 0, 0, 0]) + bytes(40),  # type 0
        bytes([5, 0, 0, 0]) + bytes(40),  # type 5
        bytes([1, 0, 0, 1]) + bytes(40),  # reserved bytes not zero
        bytes([4, 0, 0, 0]) + bytes(20),  # shorter than any WireGuard message
        bytes([0xC3]) + bytes(1199),  # QUIC long header (Initial)
        bytes([0x41]) + bytes(60),  # QUIC short header
        bytes.fromhex("000100002112a442") + bytes(12),  # STUN binding request
        bytes.fromhex("010100302112a442") + bytes(48),  # STUN binding success
        b"",
    ],
)
def test_other_datagrams_are_not(datagram: bytes) -> None:
    assert not is_wireguard_message(datagram)


@given(st.binary(min_size=1, max_size=1500))
def test_quic_packets_are_never_taken_for_wireguard(datagram: bytes) -> None:
    quic = bytes([datagram[0] | 0x40]) + datagram[1:]
    assert not is_wireguard_message(quic)


# ---- names and keys -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wg0", "cb0123abcd", "a" * 15, "wg_a.b-c"])
def test_good_interface_names(name: str) -> None:
    assert check_interface_name(name) == name


@pytest.mark.parametrize("name", ["", "a" * 16, "wg 0", "wg/0", "wg:0", "..", ".", "wg0\n"])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(OverlayFailed, match="invalid overlay interface name"):
        check_interface_name(name)


def test_a_bad_private_key_is_refused_without_being_quoted() -> None:
    secret = base64.b64encode(b"s3cret-not-a-key").decode()
    with pytest.raises(OverlayFailed) as caught:
        decode_key(secret, "the overlay's private key")
    assert secret not in str(caught.value)
    assert "private key" in str(caught.value)


def test_up_refuses_a_bad_name_before_touching_anything() -> None:
    overlay = WireGuardOverlay({})
    interface = OverlayInterface("x" * 16, ["100.96.0.1/16"], KEY)
    with pytest.raises(OverlayFailed, match="invalid overlay interface name"):
        asyncio.run(overlay.up(interface))
    assert overlay.state is None


def test_peers_need_an_overlay_that_is_up() -> None:
    with pytest.raises(OverlayFailed, match="not up"):
        asyncio.run(WireGuardOverlay({}).update_peers([OverlayPeer(KEY, ["100.96.0.2/32"])]))
    asyncio.run(WireGuardOverlay({}).down())  # idempotent, even never up


# ---- UAPI --------------------------------------------------------------------------------

GET_ANSWER = (
    "private_key=" + "ab" * 32 + "\n"
    "listen_port=51820\n"
    "fwmark=0\n"
    "public_key=" + bytes(range(32)).hex() + "\n"
    "preshared_key=" + "00" * 32 + "\n"
    "protocol_version=1\n"
    "endpoint=[fd00::2]:40000\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=100\n"
    "rx_bytes=200\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=100.96.0.2/32\n"
    "allowed_ip=fd7a::2/128\n"
    "public_key=" + bytes(range(1, 33)).hex() + "\n"
    "allowed_ip=100.96.0.3/32\n"
    "errno=0\n\n"
)


def test_a_get_answer_is_parsed_and_the_private_key_dropped() -> None:
    device = uapi.parse_get(GET_ANSWER)
    assert device.listen_port == 51820
    assert set(device.peers) == {KEY, OTHER}
    first = device.peers[KEY]
    assert first.endpoint == ("fd00::2", 40000)
    assert first.allowed_ips == ("100.96.0.2/32", "fd7a::2/128")
    assert (first.rx_bytes, first.tx_bytes, first.keepalive_seconds) == (200, 100, 25)
    assert first.last_handshake == 1700000000.5
    assert device.peers[OTHER].endpoint is None
    assert "ab" * 32 not in repr(device)
    assert uapi.answer_errno(GET_ANSWER) == 0
    assert uapi.answer_errno("errno=98\n\n") == 98


def test_a_new_peer_is_added_and_a_known_one_only_updated() -> None:
    peer = OverlayPeer(KEY, ["100.96.0.2/32"], endpoint=("203.0.113.12", 40000))
    added = uapi.peer_lines(peer, existing=False)
    assert added == [
        ("public_key", bytes(range(32)).hex()),
        ("endpoint", "203.0.113.12:40000"),
        ("persistent_keepalive_interval", "25"),
        ("replace_allowed_ips", "true"),
        ("allowed_ip", "100.96.0.2/32"),
    ]
    updated = uapi.peer_lines(peer, existing=True)
    assert ("update_only", "true") in updated
    assert ("remove", "true") not in updated
    six = OverlayPeer(KEY, [], endpoint=("fd00::2", 1))
    assert ("endpoint", "[fd00::2]:1") in uapi.peer_lines(six, existing=True)
    assert uapi.encode_set(uapi.removal_lines(KEY)) == (
        f"set=1\npublic_key={bytes(range(32)).hex()}\nremove=true\n\n".encode()
    )


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        (OverlayPeer("bm90IGEga2V5", []), "is not a WireGuard key"),
        (OverlayPeer(KEY, [], endpoint=("relay.example", 1)), "is not an IP address"),
        (OverlayPeer(KEY, ["100.96.0.300/32"]), "is not a network"),
    ],
)
def test_malformed_peers_are_refused(peer: OverlayPeer, message: str) -> None:
    with pytest.raises(OverlayFailed, match=message):
        uapi.peer_lines(peer, existing=False)


# ---- the fast path's rules ---------------------------------------------------------------


def test_only_peers_with_an_endpoint_and_a_source_port_are_rewritten() -> None:
    peers = [
        OverlayPeer(KEY, [], endpoint=("203.0.113.12", 40000), source_port=40001),
        OverlayPeer(OTHER, [], endpoint=("127.0.0.1", 5000)),  # a local proxy: no rewrite
        OverlayPeer(OTHER, [], source_port=40001),  # no path yet
    ]
    assert fastpath.rewrites(peers, 51820) == (fastpath.Rewrite("203.0.113.12", 40000, 40001),)


def test_the_ruleset_replaces_the_table_in_one_transaction() -> None:
    script = fastpath.ruleset(
        "wg0",
        51820,
        [fastpath.Rewrite("203.0.113.12", 40000, 40001), fastpath.Rewrite("fd00::2", 1, 2)],
    )
    lines = script.splitlines()
    assert lines[:3] == ["table inet cb_wg0 {}", "delete table inet cb_wg0", "table inet cb_wg0 {"]
    assert (
        "ip daddr 203.0.113.12 udp sport 51820 udp dport 40000 counter notrack"
        " udp sport set 40001" in script
    )
    assert (
        "ip saddr 203.0.113.12 udp sport 40000 udp dport 40001 udp length >= 40 @th,64,32"
        " { 0x01000000, 0x02000000, 0x03000000, 0x04000000 } counter notrack"
        " udp dport set 51820" in script
    )
    assert "ip6 saddr fd00::2 udp sport 1 udp dport 2" in script
    assert fastpath.ruleset("wg0", 51820, []) == (
        "table inet cb_wg0 {}\ndelete table inet cb_wg0\n"
    )


def test_nft_accepts_the_ruleset() -> None:
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("needs nft and unshare")
    script = fastpath.ruleset("wg-a.0", 51820, [fastpath.Rewrite("203.0.113.12", 40000, 40001)])
    # checked (-c), in a network namespace of its own, so nothing here changes
    done = subprocess.run(
        ["unshare", "--net", "nft", "-c", "-f", "-"],
        input=script,
        text=True,
        capture_output=True,
        check=False,
    )
    if "Operation not permitted" in done.stderr:
        pytest.skip("needs CAP_SYS_ADMIN to make a network namespace")
    assert done.returncode == 0, done.stderr


# ---- the hook and its settings -----------------------------------------------------------


def test_the_hook_offers_the_wireguard_overlay() -> None:
    (spec,) = cloudbridge_overlays()
    assert spec.name == "wireguard"
    overlay = spec.load(plugin_settings(SETTINGS_SCHEMA))
    assert isinstance(overlay, WireGuardOverlay)
    assert overlay.settings.backend == "auto"
    assert overlay.settings.listen_port == 0
    assert "wireguard" in load_plugins().overlays()


def test_the_settings_are_checked() -> None:
    assert plugin_settings(SETTINGS_SCHEMA, backend="wireguard-go", listen_port=51820) == {
        "backend": "wireguard-go",
        "listen_port": 51820,
    }
    for bad in ({"backend": "boringtun"}, {"listen_port": 70000}, {"mtu": 1400}):
        with pytest.raises(jsonschema.ValidationError):
            plugin_settings(SETTINGS_SCHEMA, **bad)


def test_importing_the_hooks_imports_nothing_heavy() -> None:
    code = (
        "import sys, cloudbridge_wireguard.hooks\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pyroute2', 'cryptography'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
