"""The overlay end to end: two peers of one tenant behind two NATs (tests/natbed.py), a
relay with its IPAM, real wireguard-go through the cloudbridge-wireguard plugin. The peers
reach each other by overlay address and by name, over the STUN path, over TURN when UDP
between them is lost and over DERP when all UDP is; a transfer inside the overlay
survives the moves; other tenants, on the same pool or beside them on one host, never
meet them; and nothing is left behind after SIGTERM, nor after kill -9 and a restart."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudbridge_core.config.schema import cli_schema
from jsonschema import Draft202012Validator
from nat_mesh import (
    BIN,
    QUICK,
    TOOLS,
    TURN_PASSWORD,
    TURN_USER,
    Mesh,
    block_between_peers,
    namespaces_work,
    unblock_between_peers,
)
from natbed import ROUTER, WAN, NatBed

pytestmark = [
    pytest.mark.skipif(namespaces_work() is not None, reason=str(namespaces_work())),
    pytest.mark.skipif(
        shutil.which("wireguard-go") is None,
        reason="wireguard-go is needed (./dev test installs it)",
    ),
]

ECHO_PORT = 7000
#: a tenant with a pool of its own, beside acme's default one (a LAN-free benchmark range)
INITECH_POOL = "198.19.100.0/24"
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
        document = json.loads(self.mesh.cloudbridge("ip", "--config", str(config), "--json"))
        Draft202012Validator(cli_schema("ip")).validate(document)
        addresses: list[str] = document["addresses"]
        return addresses[0]

    def config(self, name: str) -> Path:
        return self.laptop.with_name(f"{name}.yaml")

    @property
    def state_home(self) -> Path:
        """The clients' XDG_STATE_HOME: their device and overlay keys, kept in the test's
        directory rather than the home of whoever runs the tests."""
        return self.mesh.tmp / "state"

    def client(
        self, ns: str, command: list[Any], ready: str, config: Path
    ) -> subprocess.Popen[str]:
        """A ``cloudbridge`` client process in ``ns``, its output in ``config``'s .log."""
        return self.mesh.bed.spawn(
            ns,
            [BIN / "cloudbridge", *command],
            ready=ready,
            env={"XDG_STATE_HOME": str(self.state_home)},
            log=config.with_suffix(".log"),
        )

    def start(self, name: str, ns: str | None = None) -> None:
        """``cloudbridge p2p`` for ``name``: laptop in h1, server in h2, others in ``ns``."""
        bed = self.mesh.bed
        where = ns or (bed.hosts[1] if name == "laptop" else bed.hosts[2])
        config = self.config(name)
        self.processes[name] = self.client(
            where, ["p2p", "--config", config], ready="overlay ", config=config
        )

    def leftovers(self, host: int, interface: str) -> list[str]:
        """What of the overlay ``interface`` is still there in host ``host``."""
        ns = self.mesh.bed.hosts[host]
        found = []
        if interface in self.mesh.bed.exec(ns, ["ip", "-o", "link"]):
            found.append("link")
        # the interface's own tables: its filter (cbf_<interface>) and fast path (cb_<interface>)
        if interface in self.mesh.bed.exec(ns, ["nft", "list", "tables"]):
            found.append("nft table")
        if Path(f"/var/run/wireguard/{interface}.sock").exists():
            found.append("UAPI socket")
        pids = subprocess.run(
            ["pgrep", "-f", f"wireguard-go.* {interface}$"], capture_output=True, check=False
        )
        if pids.stdout.strip():
            found.append("wireguard-go")
        return found


def start_coturn(bed: NatBed, tmp: Path) -> None:
    turnserver = shutil.which("turnserver")
    assert turnserver, "coturn is not installed (./dev test installs it)"
    conf = tmp / "turnserver.conf"
    conf.write_text(
        f"listening-ip={WAN}\nrelay-ip={WAN}\nlistening-port=3478\nmin-port=49160\n"
        f"max-port=49400\nrealm=cloudbridge.test\nlt-cred-mech\n"
        f"user={TURN_USER}:{TURN_PASSWORD}\nfingerprint\nno-tls\nno-dtls\nno-cli\n"
        f"pidfile={tmp}/turn.pid\nuserdb={tmp}/turndb\nlog-file=stdout\nsimple-log\n"
    )
    bed.spawn(bed.wan, [turnserver, "-c", conf], ready="IO method (admin thread)")


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Overlay]:
    tmp = tmp_path_factory.mktemp("overlay")
    with NatBed() as bed:
        start_coturn(bed, tmp)
        state = tmp / "relay"
        env = {
            "CLOUDBRIDGE_SERVER__PUBLIC_HOST": WAN,
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
            "CLOUDBRIDGE_SERVER__OVERLAY__TENANTS__INITECH__POOL": INITECH_POOL,
        }
        relay: list[Any] = [BIN / "cloudbridge", "relay", "serve", "--state-dir", state]
        started = bed.spawn(bed.wan, relay, ready="client config:", env=env, log=tmp / "relay.log")
        mesh = Mesh(bed, tmp, started, relay, env)
        written = yaml.safe_load((state / "client.yaml").read_text())
        ice = {
            **written["p2p"]["ice"],
            "turn_servers": [
                {"url": f"turn:{WAN}:3478", "username": TURN_USER, "credential": TURN_PASSWORD}
            ],
        }
        devices = {
            "acme": ("laptop", "server", "gamma"),
            "globex": ("g-one", "g-two", "g-3"),
            "initech": ("i-one", "i-two"),
        }
        for tenant, names in devices.items():
            token = mesh.cloudbridge(
                *("relay", "token", "issue", "--state-dir", str(state), "--tenant", tenant),
                *("--subject", "peer", "--permission", "relay:connect"),
                *("--permission", "p2p:mesh"),
            ).strip()
            for name in names:
                # the laptop's metrics, in its own namespace: how its overlay packets travel
                metrics = {"enabled": name == "laptop", "prometheus_host": "127.0.0.1"}
                document = {
                    **written,
                    "auth": {"token": token},
                    "metrics": metrics,
                    "p2p": {"name": name, "ice": ice, **QUICK},
                    "overlay": {"enabled": True, "type": "wireguard"},
                }
                (tmp / f"{name}.yaml").write_text(yaml.safe_dump(document))
        found = Overlay(mesh, tmp / "laptop.yaml", tmp / "server.yaml", {})
        found.start("server")
        found.start("laptop")
        yield found


def laptop_metric(overlay: Overlay, sample: str) -> float:
    """A sample of the laptop's /metrics (``name{labels}``), read inside h1."""
    read = "import urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
    exposed = overlay.mesh.bed.exec(
        overlay.mesh.bed.hosts[1],
        [sys.executable, "-c", f"import sys; {read}", "http://127.0.0.1:9464/metrics"],
    )
    for line in exposed.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    raise AssertionError(f"{sample} not exposed")


def wait_for(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def pings_from(namespace: str, address: str, count: int = 1) -> bool:
    ping = ["ping", "-c", str(count), "-i", "0.2", "-W", "1", address]
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *ping], capture_output=True, check=False
    )
    return done.returncode == 0


def pings(overlay: Overlay, host: int, address: str) -> bool:
    return pings_from(overlay.mesh.bed.hosts[host], address)


def test_peers_reach_each_other_by_address_and_name_on_the_stun_path(overlay: Overlay) -> None:
    mesh = overlay.mesh
    mesh.wait_for_path(overlay.laptop, "stun", within=30)
    laptop_ip, server_ip = overlay.address(overlay.laptop), overlay.address(overlay.server)
    assert laptop_ip != server_ip
    status = mesh.status(overlay.laptop)
    Draft202012Validator(cli_schema("status")).validate(status)
    assert status["overlay"]["backend"] == "wireguard-go"
    assert status["overlay"]["addresses"][0].startswith(laptop_ip + "/")
    assert [p["overlay_ip"] for p in status["peers"]] == [server_ip]
    plain = mesh.cloudbridge("ip", "--config", str(overlay.laptop))
    assert plain.splitlines() == [laptop_ip]
    shown = mesh.cloudbridge("status", "--config", str(overlay.laptop)).splitlines()
    interface, (address,) = status["overlay"]["interface"], status["overlay"]["addresses"]
    assert f"Overlay:    {interface} {address} (wireguard-go)" in shown
    (row,) = [line.split() for line in shown if line.startswith("server ")]
    assert row[1] == server_ip  # the OVERLAY IP column
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
    # on the STUN path the kernel carries the overlay: the 8 MiB never went through Python
    assert laptop_metric(overlay, 'cloudbridge_client_overlay_peers{route="kernel"}') == 1
    assert laptop_metric(overlay, "cloudbridge_client_overlay_up") == 1
    proxied = laptop_metric(
        overlay, 'cloudbridge_client_overlay_proxied_bytes_total{direction="sent"}'
    )
    assert proxied < 64 << 10, f"{proxied:.0f} bytes went through Python"
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
    overlay.client(
        bed.hosts[1],
        [
            *("tunnel", "--config", config, "--local-port", str(local)),
            *("--remote-peer", "server", "--remote-port", str(ECHO_PORT + 1)),
        ],
        ready=f"tunnel 127.0.0.1:{local}",
        config=config,
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


def test_with_udp_between_the_peers_blocked_the_overlay_goes_over_turn(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    mesh.wait_for_path(overlay.laptop, "stun", within=30)
    server_ip = overlay.address(overlay.server)
    block_between_peers(bed)
    try:
        mesh.wait_for_path(overlay.laptop, "turn", within=30)
        wait_for(lambda: pings(overlay, 1, server_ip), 15, "no ping over TURN")
        before = laptop_metric(
            overlay, 'cloudbridge_client_overlay_proxied_bytes_total{direction="sent"}'
        )
        sent, received = bed.exec(
            bed.hosts[1],
            [sys.executable, TOOLS, "roundtrip", f"{server_ip}:{ECHO_PORT}", str(1 << 20), "0"],
        ).split()
        assert sent == received
        assert laptop_metric(overlay, 'cloudbridge_client_overlay_peers{route="proxy"}') == 1
        after = laptop_metric(
            overlay, 'cloudbridge_client_overlay_proxied_bytes_total{direction="sent"}'
        )
        assert after - before >= 1 << 20  # over TURN the client carries the packets
    finally:
        unblock_between_peers(bed)


def test_a_transfer_inside_the_overlay_survives_stun_to_derp_and_back(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    mesh.wait_for_path(overlay.laptop, "stun", within=30)
    server_ip = overlay.address(overlay.server)
    transfer = subprocess.Popen(
        [
            *("ip", "netns", "exec", bed.hosts[1], sys.executable, str(TOOLS)),
            *("roundtrip", f"{server_ip}:{ECHO_PORT}", str(8 << 20), "40"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)  # some of it on the stun path first
    bed.block("no_udp", "meta l4proto udp")  # TURN too
    try:
        to_derp = mesh.wait_for_path(overlay.laptop, "derp", within=30)
        wait_for(lambda: pings(overlay, 1, server_ip), 15, "no ping over DERP")
        # a transfer of its own, begun and ended over DERP
        sent, received = bed.exec(
            bed.hosts[1],
            [sys.executable, TOOLS, "roundtrip", f"{server_ip}:{ECHO_PORT}", str(1 << 20), "0"],
        ).split()
        assert sent == received
        assert mesh.peer_path(overlay.laptop) == "derp"
    finally:
        bed.unblock("no_udp")
    back = mesh.wait_for_path(overlay.laptop, "stun", within=30)
    print(f"derp after {to_derp:.1f} s, stun again {back:.1f} s after UDP was let through")
    # still running: the paced transfer spans both moves, or it would prove nothing
    assert transfer.poll() is None, "the transfer ended before the path came back to stun"
    output, _ = transfer.communicate(timeout=90)
    sent, received = output.split()
    assert sent == received


def wireguard_peers(interface: str) -> set[str]:
    """The public keys (hex) the overlay interface holds, asked over its UAPI socket."""
    with socket.socket(socket.AF_UNIX) as uapi:
        uapi.connect(f"/var/run/wireguard/{interface}.sock")
        uapi.sendall(b"get=1\n\n")
        answer = b""
        while not answer.endswith(b"\n\n"):
            answer += uapi.recv(65536)
    lines = answer.decode().splitlines()
    return {line.split("=", 1)[1] for line in lines if line.startswith("public_key=")}


def test_a_third_peer_is_reachable_in_seconds_and_removed_when_it_leaves(
    overlay: Overlay,
) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    started = time.monotonic()
    overlay.start("gamma", ns=bed.wan)  # a host with a public address of its own
    gamma_ip = overlay.address(overlay.config("gamma"))
    wait_for(lambda: pings(overlay, 1, gamma_ip), 20, "the laptop never reached gamma")
    print(f"gamma reachable from the laptop {time.monotonic() - started:.1f} s after it started")
    interface = mesh.status(overlay.laptop)["overlay"]["interface"]
    held = len(wireguard_peers(interface))
    overlay.processes["gamma"].terminate()
    assert overlay.processes["gamma"].wait(30) == 0
    wait_for(
        lambda: len(wireguard_peers(interface)) == held - 1,
        15,
        "gamma was not removed from the laptop's overlay",
    )
    assert not pings(overlay, 1, gamma_ip)


def test_two_tenants_with_the_same_pool_never_meet(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    # globex's two devices run on the routers, public hosts of their own
    overlay.start("g-one", ns=bed.routers[1])
    overlay.start("g-two", ns=bed.routers[2])
    g_two_ip = overlay.address(overlay.config("g-two"))
    globex = {overlay.address(overlay.config("g-one")), g_two_ip}
    # the same pool, counted apart: globex's devices hold the very addresses acme's do
    assert globex == {overlay.address(overlay.laptop), overlay.address(overlay.server)}
    wait_for(
        lambda: pings_from(bed.routers[1], g_two_ip),
        20,
        "globex's devices never reached each other",
    )
    # what each tenant's overlay holds: its own peers' keys, never the other tenant's
    g_one = mesh.status(overlay.config("g-one"))["overlay"]["interface"]
    laptop = mesh.status(overlay.laptop)["overlay"]["interface"]
    assert wireguard_peers(g_one).isdisjoint(wireguard_peers(laptop))
    # globex listens on g-two's address; from acme's laptop that address is acme's
    # server (or nobody): the connection never reaches globex
    bed.spawn(bed.routers[2], [sys.executable, TOOLS, "echo", f"{g_two_ip}:7002"], ready="echo")
    reach = (
        f"import socket; s = socket.socket(); s.settimeout(3)\n"
        f"try:\n s.connect(({g_two_ip!r}, 7002)); print('reached')\n"
        f"except OSError as e:\n print(type(e).__name__)"
    )
    assert bed.exec(bed.hosts[1], [sys.executable, "-c", reach]).strip() != "reached"


def test_on_a_hole_punched_path_the_kernel_carries_the_overlay(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    # globex's devices run on the routers: public addresses of their own, so host to host
    for name, router in (("g-one", 1), ("g-two", 2)):
        if name not in overlay.processes:
            overlay.start(name, ns=bed.routers[router])
    g_one = overlay.config("g-one")
    # ICE names the pair "stun" when a check arrives before the other's candidates (a
    # peer-reflexive candidate, on a busy machine): the same UDP path between the routers
    mesh.wait_for_path(g_one, {"direct", "stun"}, within=30)
    g_two_ip = overlay.address(overlay.config("g-two"))
    wait_for(
        lambda: pings_from(bed.routers[1], g_two_ip, count=3),
        20,
        "globex's devices never reached each other",
    )
    # WireGuard's packets to g-two leave from the punched port: the kernel rewrote them
    interface = mesh.status(g_one)["overlay"]["interface"]
    rules = bed.exec(bed.routers[1], ["nft", "list", "table", "inet", f"cb_{interface}"])
    (leaving,) = [line for line in rules.splitlines() if f"ip daddr {ROUTER[2]}" in line]
    assert int(re.search(r"counter packets (\d+)", leaving)[1]) >= 3  # type: ignore[index]


def test_a_pool_over_a_route_of_this_host_is_refused_naming_it(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    # globex's pool is acme's, which the laptop's overlay already routes in h1
    laptop = mesh.status(overlay.laptop)["overlay"]["interface"]
    config = overlay.config("g-3")
    log = config.with_suffix(".log")
    overlay.client(bed.hosts[1], ["p2p", "--config", config], ready="no overlay", config=config)
    wait_for(lambda: log.exists() and "no overlay" in log.read_text(), 5, "no reason given")
    said = log.read_text()
    assert f"overlaps the route 100.64.0.0/10 dev {laptop}" in said
    assert "server.overlay.tenants.<tenant>.pool" in said
    assert mesh.status(config)["overlay"] is None
    assert overlay.address(overlay.laptop) in mesh.status(overlay.laptop)["overlay"]["addresses"][0]


def test_two_tenants_on_one_host_each_have_an_interface_of_their_own(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    # initech's devices run beside acme's, one in each host, on a pool of initech's own
    overlay.start("i-one", ns=bed.hosts[1])
    overlay.start("i-two", ns=bed.hosts[2])
    initech = mesh.status(overlay.config("i-one"))["overlay"]
    acme = mesh.status(overlay.laptop)["overlay"]
    assert initech["interface"] != acme["interface"]
    address = ipaddress.ip_interface(initech["addresses"][0])
    assert address.network == ipaddress.ip_network(INITECH_POOL)
    i_two_ip = overlay.address(overlay.config("i-two"))
    wait_for(lambda: pings(overlay, 1, i_two_ip), 20, "initech's devices never reached each other")
    assert pings(overlay, 1, overlay.address(overlay.server)), "acme's overlay was disturbed"
    assert wireguard_peers(initech["interface"]).isdisjoint(wireguard_peers(acme["interface"]))
    for name in ("i-one", "i-two"):
        overlay.processes[name].terminate()
        assert overlay.processes[name].wait(30) == 0
    assert overlay.leftovers(1, initech["interface"]) == []
    assert overlay.leftovers(1, acme["interface"]) == [
        "link",
        "nft table",
        "UAPI socket",
        "wireguard-go",
    ]


def test_overlay_allow_follows_a_reload(overlay: Overlay) -> None:
    bed = overlay.mesh.bed
    server_ip = overlay.address(overlay.server)
    wait_for(lambda: pings(overlay, 1, server_ip), 15, "no ping before the filter")
    document = yaml.safe_load(overlay.server.read_text())
    document["overlay"]["allow"] = [{"peers": ["laptop"], "protocol": "tcp", "ports": [ECHO_PORT]}]
    overlay.server.write_text(yaml.safe_dump(document))
    wait_for(lambda: not pings(overlay, 1, server_ip), 15, "ping still allowed")
    sent, received = bed.exec(
        bed.hosts[1],
        [sys.executable, TOOLS, "roundtrip", f"{server_ip}:{ECHO_PORT}", str(1 << 16), "0"],
    ).split()
    assert sent == received
    other = (
        f"import socket; s = socket.socket(); s.settimeout(2)\n"
        f"try:\n s.connect(({server_ip!r}, {ECHO_PORT + 1})); print('reached')\n"
        f"except OSError as e:\n print(type(e).__name__)"
    )
    assert bed.exec(bed.hosts[1], [sys.executable, "-c", other]).strip() == "TimeoutError"
    del document["overlay"]["allow"]
    overlay.server.write_text(yaml.safe_dump(document))
    wait_for(lambda: pings(overlay, 1, server_ip), 15, "ping not allowed again")


def test_without_cap_net_admin_the_client_says_so_and_stays_in_the_mesh(overlay: Overlay) -> None:
    mesh, bed = overlay.mesh, overlay.mesh.bed
    config = overlay.server.with_name("nocap.yaml")
    document = yaml.safe_load(overlay.server.read_text())
    document["p2p"]["name"] = "nocap"
    config.write_text(yaml.safe_dump(document))
    log = config.with_suffix(".log")
    setpriv = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    bed.spawn(
        bed.hosts[2],
        [*setpriv, BIN / "cloudbridge", "p2p", "--config", config],
        ready="in the mesh as",
        env={"XDG_STATE_HOME": str(overlay.state_home)},
        log=log,
    )
    wait_for(
        lambda: log.exists() and "no overlay: the overlay needs CAP_NET_ADMIN" in log.read_text(),
        5,
        "the client did not say the overlay needs CAP_NET_ADMIN",
    )
    status = mesh.status(config)
    assert status["overlay"] is None
    assert status["state"] == "connected"
    asked = subprocess.run(
        [BIN / "cloudbridge", "ip", "--config", config, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert asked.returncode == 1
    assert asked.stdout == ""
    error = json.loads(asked.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "overlay_failed"
    assert "this device has no overlay address" in error["message"]
    wait_for(
        lambda: any(p["name"] == "nocap" for p in mesh.status(overlay.laptop)["peers"]),
        15,
        "the laptop never saw the device without the overlay",
    )
    # it asked for no address: the relay holds none for it
    leases = json.loads(
        mesh.cloudbridge(
            *("relay", "ipam", "list", "--state-dir", str(mesh.tmp / "relay")),
            *("--tenant", "acme", "--json"),
        )
    )["leases"]
    assert "nocap" not in [lease["device"] for lease in leases]


def test_nothing_is_left_after_sigterm_nor_after_kill_and_a_restart(overlay: Overlay) -> None:
    interface = overlay.mesh.status(overlay.laptop)["overlay"]["interface"]
    address = overlay.address(overlay.laptop)
    overlay.processes["laptop"].send_signal(signal.SIGKILL)
    overlay.processes["laptop"].wait(10)
    # what a kill leaves: the nftables tables at least (wireguard-go, told by the kernel
    # that its parent died, may take its interface with it, or not yet)
    assert "nft table" in overlay.leftovers(1, interface)
    overlay.start("laptop")  # cleans it up, and comes back with the same address
    assert overlay.mesh.status(overlay.laptop)["overlay"]["interface"] == interface
    assert overlay.address(overlay.laptop) == address
    overlay.processes["laptop"].terminate()
    assert overlay.processes["laptop"].wait(30) == 0
    assert overlay.leftovers(1, interface) == []


def test_no_overlay_private_key_reaches_a_log(overlay: Overlay) -> None:
    keys = sorted((overlay.state_home / "cloudbridge").glob("overlay-*.key"))
    assert len(keys) >= 2, "the clients' overlay keys are not where the test keeps them"
    logs = sorted(overlay.mesh.tmp.glob("*.log"))
    assert len(logs) >= 2
    for key in keys:
        private = key.read_text().strip()
        for log in logs:
            written = log.read_text()
            assert private not in written, f"{key.name} is in {log.name}"
            assert base64.b64decode(private).hex() not in written, f"{key.name} is in {log.name}"
