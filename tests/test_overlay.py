"""The overlay end to end: two peers of one tenant behind two NATs (tests/natbed.py), a
relay with its IPAM, real wireguard-go through the cloudbridge-wireguard plugin. The peers
reach each other by overlay address and by name, over the STUN path and over DERP when
UDP between them is lost, a transfer inside the overlay survives the moves, and nothing
is left behind after SIGTERM, nor after kill -9 and a restart."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from nat_mesh import (
    BIN,
    QUICK,
    TOOLS,
    Mesh,
    block_between_peers,
    namespaces_work,
    unblock_between_peers,
)
from natbed import WAN, NatBed

pytestmark = [
    pytest.mark.skipif(namespaces_work() is not None, reason=str(namespaces_work())),
    pytest.mark.skipif(
        shutil.which("wireguard-go") is None,
        reason="wireguard-go is needed (./dev test installs it)",
    ),
]

ECHO_PORT = 7000
RESOLVE = """
import sys, dns.message, dns.query, dns.rdatatype
query = dns.message.make_query(sys.argv[2], dns.rdatatype.A)
answer = dns.query.udp(query, sys.argv[1], timeout=3)
print(" ".join(r.to_text() for rrset in answer.answer for r in rrset))
"""


@dataclass
class Overlay:
    mesh: Mesh
    laptop: Path
    server: Path
    processes: dict[str, subprocess.Popen[str]]

    def address(self, config: Path) -> str:
        done = self.mesh.cloudbridge("ip", "--config", str(config), "--json")
        addresses: list[str] = json.loads(done)["addresses"]
        return addresses[0]

    def start(self, name: str) -> None:
        host, config = (1, self.laptop) if name == "laptop" else (2, self.server)
        self.processes[name] = self.mesh.bed.spawn(
            self.mesh.bed.hosts[host],
            [BIN / "cloudbridge", "p2p", "--config", config],
            ready="overlay ",
            log=config.with_suffix(".log"),
        )

    def leftovers(self, host: int, interface: str) -> list[str]:
        """What of the overlay ``interface`` is still there in host ``host``."""
        ns = self.mesh.bed.hosts[host]
        found = []
        if interface in self.mesh.bed.exec(ns, ["ip", "-o", "link"]):
            found.append("link")
        if "cb" in self.mesh.bed.exec(ns, ["nft", "list", "tables"]):
            found.append("nft table")
        if Path(f"/var/run/wireguard/{interface}.sock").exists():
            found.append("UAPI socket")
        pids = subprocess.run(
            ["pgrep", "-f", f"wireguard-go.* {interface}$"], capture_output=True, check=False
        )
        if pids.stdout.strip():
            found.append("wireguard-go")
        return found


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Overlay]:
    tmp = tmp_path_factory.mktemp("overlay")
    with NatBed() as bed:
        state = tmp / "relay"
        env = {"CLOUDBRIDGE_SERVER__PUBLIC_HOST": WAN, "CLOUDBRIDGE_METRICS__ENABLED": "false"}
        relay: list[Any] = [BIN / "cloudbridge", "relay", "serve", "--state-dir", state]
        started = bed.spawn(bed.wan, relay, ready="client config:", env=env, log=tmp / "relay.log")
        mesh = Mesh(bed, tmp, started, relay, env)
        token = mesh.cloudbridge(
            *("relay", "token", "issue", "--state-dir", str(state), "--tenant", "acme"),
            *("--subject", "peer", "--permission", "relay:connect", "--permission", "p2p:mesh"),
        ).strip()
        written = yaml.safe_load((state / "client.yaml").read_text())
        configs = []
        for name in ("laptop", "server"):
            config = tmp / f"{name}.yaml"
            document = {
                **written,
                "auth": {"token": token},
                "metrics": {"enabled": False},
                "p2p": {"name": name, "ice": written["p2p"]["ice"], **QUICK},
                "overlay": {"enabled": True},
            }
            config.write_text(yaml.safe_dump(document))
            configs.append(config)
        found = Overlay(mesh, configs[0], configs[1], {})
        found.start("server")
        found.start("laptop")
        yield found


def wait_for(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def pings(overlay: Overlay, host: int, address: str) -> bool:
    ping = ["ping", "-c", "1", "-W", "1", address]
    done = subprocess.run(
        ["ip", "netns", "exec", overlay.mesh.bed.hosts[host], *ping],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def test_peers_reach_each_other_by_address_and_name_on_the_stun_path(overlay: Overlay) -> None:
    mesh = overlay.mesh
    mesh.wait_for_path(overlay.laptop, "stun", within=30)
    laptop_ip, server_ip = overlay.address(overlay.laptop), overlay.address(overlay.server)
    assert laptop_ip != server_ip
    status = mesh.status(overlay.laptop)
    assert status["overlay"]["backend"] == "wireguard-go"
    assert status["overlay"]["addresses"][0].startswith(laptop_ip + "/")
    assert [p["overlay_ip"] for p in status["peers"]] == [server_ip]
    wait_for(lambda: pings(overlay, 1, server_ip), 20, "no ping over the overlay")
    assert pings(overlay, 2, laptop_ip)
    bed = mesh.bed
    bed.spawn(bed.hosts[2], [sys.executable, TOOLS, "echo", f"0.0.0.0:{ECHO_PORT}"], ready="echo")
    sent, received = bed.exec(
        bed.hosts[1],
        [sys.executable, TOOLS, "roundtrip", f"{server_ip}:{ECHO_PORT}", str(8 << 20), "0"],
        timeout=60,
    ).split()
    assert sent == received
    resolved = bed.exec(
        bed.hosts[1], [sys.executable, "-c", RESOLVE, server_ip, "server.acme.cloudbridge.internal"]
    )
    assert resolved.split() == [server_ip]
    mine = bed.exec(
        bed.hosts[2], [sys.executable, "-c", RESOLVE, laptop_ip, "laptop.acme.cloudbridge.internal"]
    )
    assert mine.split() == [laptop_ip]


def test_a_peer_tunnel_goes_over_the_overlay_when_it_is_up(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    server_ip = overlay.address(overlay.server)
    # served on the overlay address alone: a peer stream (to the peer's loopback) finds
    # nothing there, so an answer proves the connection went over the overlay
    only_overlay = f"{server_ip}:{ECHO_PORT + 1}"
    bed.spawn(bed.hosts[2], [sys.executable, TOOLS, "echo", only_overlay], ready="echo")
    config = overlay.laptop.with_name("tunnel.yaml")
    document = yaml.safe_load(overlay.laptop.read_text())
    document["p2p"]["name"] = "laptop-tunnel"
    config.write_text(yaml.safe_dump(document))
    local = 7300
    bed.spawn(
        bed.hosts[1],
        [
            *(BIN / "cloudbridge", "tunnel", "--config", config, "--local-port", str(local)),
            *("--remote-peer", "server", "--remote-port", str(ECHO_PORT + 1)),
        ],
        ready=f"tunnel 127.0.0.1:{local}",
        log=config.with_suffix(".log"),
    )
    wait_for(
        lambda: any(p["name"] == "server" for p in mesh.status(config)["peers"]),
        15,
        "the tunnel's client never saw the server",
    )
    sent, received = bed.exec(
        bed.hosts[1], [sys.executable, TOOLS, "roundtrip", str(local), str(1 << 20), "0"]
    ).split()
    assert sent == received


def test_a_transfer_inside_the_overlay_survives_stun_to_derp_and_back(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    mesh.wait_for_path(overlay.laptop, "stun", within=30)
    server_ip = overlay.address(overlay.server)
    transfer = subprocess.Popen(
        [
            *("ip", "netns", "exec", bed.hosts[1], sys.executable, str(TOOLS)),
            *("roundtrip", f"{server_ip}:{ECHO_PORT}", str(8 << 20), "20"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    block_between_peers(bed)
    try:
        mesh.wait_for_path(overlay.laptop, "derp", within=20)
        wait_for(lambda: pings(overlay, 1, server_ip), 15, "no ping over DERP")
    finally:
        unblock_between_peers(bed)
    mesh.wait_for_path(overlay.laptop, "stun", within=30)
    output, _ = transfer.communicate(timeout=90)
    sent, received = output.split()
    assert sent == received


def test_nothing_is_left_after_sigterm_nor_after_kill_and_a_restart(overlay: Overlay) -> None:
    interface = overlay.mesh.status(overlay.laptop)["overlay"]["interface"]
    overlay.processes["laptop"].send_signal(signal.SIGKILL)
    overlay.processes["laptop"].wait(10)
    assert "link" in overlay.leftovers(1, interface)  # what a kill leaves
    overlay.start("laptop")  # cleans it up, and comes back with the same address
    assert overlay.mesh.status(overlay.laptop)["overlay"]["interface"] == interface
    overlay.processes["laptop"].terminate()
    assert overlay.processes["laptop"].wait(30) == 0
    assert overlay.leftovers(1, interface) == []
