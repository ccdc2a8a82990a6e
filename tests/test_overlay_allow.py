"""``overlay.allow`` as nftables enforces it, in a namespace the test creates: the table
the overlay installs on its interface lets in exactly what the entries name (here the
interface is a veth standing in for the overlay's; the rules only look at its name)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys

import pytest
from cloudbridge_core.overlay import allow
from cloudbridge_core.settings import OverlayAllowRule
from nat_mesh import namespaces_work
from netns import Netns

pytestmark = pytest.mark.skipif(namespaces_work() is not None, reason=str(namespaces_work()))

LISTENER = """
import socket, sys
servers = []
for port in map(int, sys.argv[1:]):
    s = socket.create_server(("0.0.0.0", port)); servers.append(s)
print("listening", file=sys.stderr, flush=True)
import select
while True:
    for s in select.select(servers, [], [])[0]:
        s.accept()[0].close()
"""


def reaches(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def test_only_what_an_entry_allows_gets_in_and_replies_always_do() -> None:
    with Netns() as ns:
        interface = f"cbn{ns.name[4:]}"  # the namespace's end of the veth
        pool = ipaddress.IPv4Network(f"{ns.address}/24", strict=False)
        ns.spawn([sys.executable, "-c", LISTENER, "7000", "7001"], ready="listening")
        rules = [OverlayAllowRule(peers=("laptop",), protocol="tcp", ports=(7000,))]
        table = allow.ruleset(interface, pool, rules, {"laptop": ns.host_address}, dns=False)
        ns.nft(table)
        assert reaches(ns.address, 7000)
        assert not reaches(ns.address, 7001)
        ping = ["ping", "-c1", "-W1", ns.address]
        assert subprocess.run(ping, capture_output=True, check=False).returncode != 0
        # the namespace's own connections out get their answers
        out = ["ip", "netns", "exec", ns.name, "ping", "-c1", "-W2", ns.host_address]
        assert subprocess.run(out, capture_output=True, check=False).returncode == 0
        # an entry naming a peer not in the mesh lets nobody in; the default lets all in
        ns.nft(allow.ruleset(interface, pool, rules, {}, dns=False))
        assert not reaches(ns.address, 7000)
        everyone = [OverlayAllowRule(peers=("*",), protocol="any", ports=())]
        ns.nft(allow.ruleset(interface, pool, everyone, {}, dns=False))
        assert reaches(ns.address, 7001)
        assert subprocess.run(ping, capture_output=True, check=False).returncode == 0


def test_every_kind_of_entry_is_valid_nftables() -> None:
    rules = [
        OverlayAllowRule(peers=("*",), protocol="any", ports=(22, 80)),
        OverlayAllowRule(peers=("a", "b"), protocol="udp", ports=()),
        OverlayAllowRule(peers=("a",), protocol="udp", ports=(53,)),
        OverlayAllowRule(peers=("b",), protocol="icmp", ports=()),
    ]
    peers = {"a": "100.64.0.2", "b": "100.64.0.3"}
    table = allow.ruleset("cb-test.0", ipaddress.IPv4Network("100.64.0.0/10"), rules, peers, True)
    with Netns() as ns:
        ns.nft(table)
        listed = subprocess.run(
            ["ip", "netns", "exec", ns.name, "nft", "list", "table", "inet", "cbf_cb_test_0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "100.64.0.2" in listed
        assert "dport 53" in listed
        remove = (
            "import asyncio; from cloudbridge_core.overlay import allow;"
            " asyncio.run(allow.remove('cb-test.0'))"
        )
        subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", remove], check=True)
        gone = subprocess.run(
            ["ip", "netns", "exec", ns.name, "nft", "list", "tables"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "cbf_" not in gone
