"""The paths the benchmark measures, each a forwarder from a local port to the target.

Every path is a context manager yielding a :class:`Forwarder`: the port the bench's clients
connect to, and the processes whose memory and CPU count as the path's cost. A reference
tool that cannot run here raises :class:`procs.Unavailable` with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cloudbridge_core.tlsutil import generate_ca
from procs import BIN, Unavailable, free_port, serving, started

#: the transports measured, in auto mode's preference order (plugins that are installed)
TRANSPORTS = [
    name
    for name, module in (
        ("quic", "cloudbridge_quic"),
        ("grpc", "cloudbridge_grpc"),
        ("websocket", "cloudbridge_websocket"),
        ("tls", "cloudbridge_core"),
    )
    if importlib.util.find_spec(module) is not None
]
WSTUNNEL = Path(__file__).parent / "wstunnel" / "node_modules" / ".bin" / "wstunnel"
SSHD = "/usr/sbin/sshd"
ENGINE = Path(__file__).with_name("quic_engine.py")


@dataclass
class Forwarder:
    name: str
    port: int
    #: the processes (with their descendants) whose memory and CPU the path costs
    pids: list[int] = field(default_factory=list)


@contextmanager
def direct(target: int) -> Iterator[Forwarder]:
    yield Forwarder("direct", target)


@contextmanager
def socat(target: int, host: str = "127.0.0.1") -> Iterator[Forwarder]:
    if not shutil.which("socat"):
        raise Unavailable("socat is not installed (apt-get install socat)")
    port = free_port()
    command = [
        "socat",
        f"TCP-LISTEN:{port},fork,reuseaddr,nodelay,backlog=4096,bind=127.0.0.1",
        f"TCP:{host}:{target},nodelay",
    ]
    with serving(command, port) as process:
        yield Forwarder("socat", port, [process.pid])


def _sshd_config(home: Path, port: int) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {home}/host_key",
            f"AuthorizedKeysFile {home}/authorized_keys",
            "PidFile none",
            "UsePAM no",
            # the temporary directory's modes are not sshd's business here
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "LogLevel ERROR",
            "",
        ]
    )


@contextmanager
def ssh(target: int) -> Iterator[Forwarder]:
    """``ssh -L`` through a throwaway sshd on loopback: its own host key and user key in a
    temporary directory, default cipher, logging in as whoever runs the bench."""
    if not (shutil.which("ssh") and shutil.which("ssh-keygen") and Path(SSHD).exists()):
        raise Unavailable("ssh or sshd is missing (apt-get install openssh-client openssh-server)")
    if os.geteuid() == 0:
        # sshd run by root insists on its privilege-separation directory, which the
        # openssh-server package leaves to its service unit to create
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ssh-")))
        for key in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True
            )
        (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
        sshd_port, port = free_port(), free_port()
        (home / "sshd_config").write_text(_sshd_config(home, sshd_port))
        server = stack.enter_context(
            serving([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], sshd_port)
        )
        client = stack.enter_context(
            serving(
                [
                    *("ssh", "-N", "-F", "/dev/null", "-i", str(home / "user_key")),
                    *("-p", str(sshd_port), "-L", f"127.0.0.1:{port}:127.0.0.1:{target}"),
                    *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
                    *("-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"),
                    *("-o", "LogLevel=ERROR"),
                    f"{pwd.getpwuid(os.geteuid()).pw_name}@127.0.0.1",
                ],
                port,
            )
        )
        yield Forwarder("ssh", port, [server.pid, client.pid])


@contextmanager
def wstunnel(target: int) -> Iterator[Forwarder]:
    """wstunnel (npm) as a TCP forward over WebSocket: a server locked to the target, a client."""
    if not (WSTUNNEL.exists() and shutil.which("node")):
        raise Unavailable(
            "wstunnel is not installed (npm ci --prefix bench/wstunnel; ./dev bench does it)"
        )
    server_port, port = free_port(), free_port()
    with (
        serving(
            [str(WSTUNNEL), "-s", f"127.0.0.1:{server_port}", "-t", f"127.0.0.1:{target}"],
            server_port,
        ) as server,
        serving(
            [
                *(str(WSTUNNEL), "--uuid", "bench"),
                *("-t", f"127.0.0.1:{port}:127.0.0.1:{target}", f"ws://127.0.0.1:{server_port}"),
            ],
            port,
        ) as client,
    ):
        yield Forwarder("wstunnel", port, [server.pid, client.pid])


@contextmanager
def wstunnel_tls(target: int) -> Iterator[Forwarder]:
    """wstunnel as it runs over TLS (``wss://``), the work the WebSocket transport does: its
    server has no TLS of its own and is meant to sit behind a terminator, here socat's
    OpenSSL (a process per connection, 128 KiB buffers so that it is not the bottleneck)."""
    if not (WSTUNNEL.exists() and shutil.which("node") and shutil.which("socat")):
        raise Unavailable(
            "wstunnel or socat is missing (npm ci --prefix bench/wstunnel; ./dev bench does it)"
        )
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-wss-")))
        pair = generate_ca("bench")  # self-signed; the client accepts any certificate
        (home / "server.pem").write_bytes(pair.certificate + pair.key)
        server_port, tls_port, port = free_port(), free_port(), free_port()
        server = stack.enter_context(
            serving(
                [str(WSTUNNEL), "-s", f"127.0.0.1:{server_port}", "-t", f"127.0.0.1:{target}"],
                server_port,
            )
        )
        terminator = stack.enter_context(
            serving(
                [
                    *("socat", "-b", str(128 * 1024)),
                    f"OPENSSL-LISTEN:{tls_port},cert={home / 'server.pem'},verify=0,"
                    "fork,reuseaddr,nodelay,backlog=4096,bind=127.0.0.1",
                    f"TCP:127.0.0.1:{server_port},nodelay",
                ],
                tls_port,
            )
        )
        client = stack.enter_context(
            serving(
                [
                    *(str(WSTUNNEL), "--anycert", "--uuid", "bench"),
                    *("-t", f"127.0.0.1:{port}:127.0.0.1:{target}", f"wss://127.0.0.1:{tls_port}"),
                ],
                port,
            )
        )
        yield Forwarder("wstunnel-tls", port, [server.pid, terminator.pid, client.pid])


@dataclass
class Namespace:
    """A network namespace joined to this one by a veth pair (its MTU is the point)."""

    name: str
    #: this side's address and the namespace's (198.18.0.0/15: the benchmarking range)
    host_address: str
    address: str

    def command(self, command: list[str]) -> list[str]:
        # `ip netns exec` execs the command: the process started is the command itself
        return ["ip", "netns", "exec", self.name, *command]


@contextmanager
def namespace(mtu: int) -> Iterator[Namespace]:
    """A namespace for the far end of a path with a real link's MTU (loopback's is 65,536)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise Unavailable("a network namespace needs root and iproute2 (apt-get install iproute2)")
    suffix = secrets.token_hex(3)
    subnet = 128 + int(suffix, 16) % 120
    space = Namespace(f"cbbench-{suffix}", f"198.18.{subnet}.1", f"198.18.{subnet}.2")
    host_link, far_link = f"cbbh{suffix}", f"cbbn{suffix}"
    try:
        for command in (
            f"ip netns add {space.name}",
            f"ip link add {host_link} mtu {mtu} type veth peer name {far_link} mtu {mtu}"
            f" netns {space.name}",
            f"ip addr add {space.host_address}/24 dev {host_link}",
            f"ip link set {host_link} up",
            f"ip -n {space.name} addr add {space.address}/24 dev {far_link}",
            f"ip -n {space.name} link set {far_link} up",
            f"ip -n {space.name} link set lo up",
        ):
            try:
                subprocess.run(command.split(), check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as error:
                raise Unavailable(f"no network namespace: {error.stderr.strip()}") from error
        yield space
    finally:
        # `ip netns del` leaves the processes inside running
        pids = subprocess.run(
            ["ip", "netns", "pids", space.name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", space.name], capture_output=True, check=False)


@dataclass
class Engine:
    """The QUIC engine alone across a link: a bare server (quic_engine.py) in the namespace,
    measured by running the same script's client here."""

    name: str
    host: str
    port: int
    #: the server's process (the client's CPU comes from its own report)
    pids: list[int]
    #: the engine's settings, as the peer session's on this path
    options: list[str]

    def client(self, megabytes: int, timeout: float) -> list[str]:
        return [
            *(sys.executable, str(ENGINE), "run", self.host, str(self.port), *self.options),
            *("--megabytes", str(megabytes), "--timeout", str(timeout)),
        ]


@contextmanager
def quic_engine(space: Namespace) -> Iterator[Engine]:
    """aioquic's own rate across the link, with the datagram size and receive windows a
    peer session uses there (issue 15 holds a peer on a UDP-only path to it: udp_peer)."""
    # the peer session's settings, read where they are defined (imports aioquic and aioice)
    from cloudbridge_core.p2p.session import (  # noqa: PLC0415
        CONNECTION_WINDOW,
        DIRECT_CEILING,
        STREAM_WINDOW,
    )
    from cloudbridge_core.quic.pmtu import path_payload_size  # noqa: PLC0415

    port = free_port()  # the namespace's ports are all free; any number will do there
    options = [
        *("--datagram-size", str(path_payload_size((space.address, port), DIRECT_CEILING))),
        *("--stream-window", str(STREAM_WINDOW), "--connection-window", str(CONNECTION_WINDOW)),
    ]
    command = [sys.executable, str(ENGINE), "serve", space.address, str(port), *options]
    with started(space.command(command), "ready") as server:
        yield Engine("quic-engine", space.address, port, [server.pid], options)


@dataclass
class Relay:
    pid: int
    state: str
    token: str


@contextmanager
def relay(namespace: Namespace | None = None) -> Iterator[Relay]:
    """A CloudBridge relay serving every installed transport, and a client token: on loopback,
    or in ``namespace`` on its address (its own loopback is where the tunnels lead)."""
    address = "127.0.0.1" if namespace is None else namespace.address
    command = [str(BIN / "cloudbridge"), "relay", "serve", "--dev", "--state-dir"]
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as state:
        env = {
            **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(free_port()) for n in TRANSPORTS},
            "CLOUDBRIDGE_SERVER__LISTEN": address,
            # the name in its certificate and in the client.yaml it writes
            "CLOUDBRIDGE_SERVER__PUBLIC_HOST": address,
            "CLOUDBRIDGE_LOGGING__LEVEL": "warning",
        }
        if namespace is not None:
            command = namespace.command(command)
        with started([*command, state], "client config:", env) as process:
            token = subprocess.run(
                [
                    *(str(BIN / "cloudbridge"), "relay", "token", "issue", "--state-dir", state),
                    *("--tenant", "bench", "--subject", "bench"),
                    *("--permission", "relay:connect", "--permission", "tunnel:create"),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            yield Relay(process.pid, state, token)


@contextmanager
def cloudbridge(
    server: Relay, transport: str, target: int, connections: int
) -> Iterator[Forwarder]:
    """A ``cloudbridge tunnel`` client over ``transport`` to the relay, forwarding to the target.

    The client holds up to ``connections`` tunnelled connections at once (its default limit,
    100, would refuse the idle set); the relay keeps its defaults (1,024 streams a session).
    """
    port = free_port()
    env = {
        "CLOUDBRIDGE_AUTH__TOKEN": server.token,
        "CLOUDBRIDGE_PERFORMANCE__MAX_CONCURRENT_TUNNELS": str(connections),
        "CLOUDBRIDGE_TRANSPORT__MODE": transport,
        "CLOUDBRIDGE_METRICS__ENABLED": "false",
        "CLOUDBRIDGE_LOGGING__LEVEL": "warning",
    }
    command = [
        *(str(BIN / "cloudbridge"), "tunnel", "--config", f"{server.state}/client.yaml"),
        *("--control-socket", f"{server.state}/{transport}.sock", "--local-port", str(port)),
        *("--remote-host", "127.0.0.1", "--remote-port", str(target)),
    ]
    with started(command, "tunnel 127.0.0.1:", env) as client:
        yield Forwarder(f"cloudbridge-{transport}", port, [server.pid, client.pid])


def _peer_config(relay: Relay, token: str, name: str, expose: list[int], path: Path) -> None:
    written = yaml.safe_load((Path(relay.state) / "client.yaml").read_text())
    p2p = {"name": name, "expose": expose, "heartbeat_interval": "1s"}
    if "p2p" in written:  # the relay's STUN server (one on loopback writes none)
        p2p["ice"] = written["p2p"]["ice"]
    document = {**written, "auth": {"token": token}, "metrics": {"enabled": False}, "p2p": p2p}
    path.write_text(yaml.safe_dump(document))


def _peer_path(control_socket: Path) -> tuple[str, str] | None:
    """The near peer's (path, protocol) once it is connected (status --json)."""
    status = subprocess.run(
        [str(BIN / "cloudbridge"), "status", "--control-socket", str(control_socket), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if status.returncode != 0:
        return None
    peers = json.loads(status.stdout).get("peers") or []
    if not peers or not peers[0]["connected"]:
        return None
    return peers[0]["path"], peers[0].get("protocol") or "quic"


@contextmanager
def peer(
    server: Relay,
    space: Namespace | None,
    target: int,
    connections: int,
    within: float = 30.0,
    protocol: str = "tcp",
    mode: str = "p2p-only",
    path: str = "direct",
) -> Iterator[Forwarder]:
    """A peer tunnel (`tunnel --remote-peer`, p2p-only) from this side to a peer in ``space``
    that exposes the target there, on the direct path over ``protocol``: the TCP path, which
    each peer can dial here (ICE's direct path carries the QUIC session beside it), or
    where TCP is blocked (:func:`udp_peer`) the QUIC session on ICE's direct path.
    With ``mode`` relay-only (:func:`derp_peer`), on the relay's ``derp`` path instead.

    The relay (in ``space`` too) only introduces the peers, except on ``derp``; the cost
    counted is the two peers' processes.
    """
    token = subprocess.run(
        [
            *(str(BIN / "cloudbridge"), "relay", "token", "issue", "--state-dir", server.state),
            *("--tenant", "bench", "--subject", "peer", "--permission", "relay:connect"),
            *("--permission", "p2p:mesh", "--permission", "tunnel:create"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    state = Path(server.state)
    _peer_config(server, token, "far", [target], state / "far.yaml")
    _peer_config(server, token, "near", [], state / "near.yaml")
    port = free_port()
    env = {
        "CLOUDBRIDGE_PERFORMANCE__MAX_CONCURRENT_TUNNELS": str(connections),
        "CLOUDBRIDGE_LOGGING__LEVEL": "warning",
    }
    far_command = [
        *(str(BIN / "cloudbridge"), "p2p", "--config", str(state / "far.yaml")),
        *("--control-socket", str(state / "far.sock"), "--mode", mode),
    ]
    near_command = [
        *(str(BIN / "cloudbridge"), "tunnel", "--config", str(state / "near.yaml")),
        *("--control-socket", str(state / "near.sock"), "--local-port", str(port)),
        *("--remote-peer", "far", "--remote-port", str(target), "--mode", mode),
    ]
    if space is not None:
        far_command = space.command(far_command)
    with (
        started(far_command, "in the mesh as", env) as far,
        started(near_command, "tunnel 127.0.0.1:", env) as near,
    ):
        deadline = time.monotonic() + within
        while (found := _peer_path(state / "near.sock")) != (path, protocol):
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the peers found no {path} {protocol} path in {within:g} s ({found})"
                )
            time.sleep(0.2)
        relaying = [server.pid] if path == "derp" else []
        yield Forwarder("peer", port, [near.pid, far.pid, *relaying])


#: the nftables table that keeps TCP off the link for :func:`udp_peer`
_UDP_ONLY_TABLE = "cbbench_udp_only"


@contextmanager
def tcp_blocked(space: Namespace, server: Relay) -> Iterator[None]:
    """No TCP across the link except to the relay's ports, as behind a firewall that lets
    UDP through: peers there have no TCP path to each other (nftables in ``space``)."""
    if not shutil.which("nft"):
        raise Unavailable("a UDP-only path needs nftables (apt-get install nftables)")
    written = yaml.safe_load((Path(server.state) / "client.yaml").read_text())
    ports = ", ".join(str(section["port"]) for section in written["transport"].values())
    # this side's packets to any other TCP port there are dropped: its dials to a peer
    # there, and the answers to that peer's dials here
    rules = "\n".join(
        [
            f"table inet {_UDP_ONLY_TABLE} {{",
            "  chain input {",
            "    type filter hook input priority 0; policy accept;",
            f"    ip saddr {space.host_address} tcp dport != {{ {ports} }} drop",
            "  }",
            "}",
            "",
        ]
    )
    try:
        subprocess.run(
            space.command(["nft", "-f", "-"]),
            input=rules,
            text=True,
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as error:
        raise Unavailable(f"no UDP-only path: nft: {error.stderr.strip()}") from error
    try:
        yield
    finally:
        subprocess.run(
            space.command(["nft", "delete", "table", "inet", _UDP_ONLY_TABLE]),
            capture_output=True,
            check=False,
        )


@contextmanager
def udp_peer(server: Relay, space: Namespace, target: int, connections: int) -> Iterator[Forwarder]:
    """The peer tunnel of :func:`peer` on a UDP-only path: TCP across the link blocked, its
    streams ride the peer QUIC session on ICE's direct path (issue 15 holds it to the QUIC
    engine's own rate, :func:`quic_engine`)."""
    with (
        tcp_blocked(space, server),
        peer(server, space, target, connections, protocol="quic") as forwarder,
    ):
        yield forwarder


#: what carries a peer session over DERP: raw connections to the relay's TLS port, which
#: the relay joins (the cheaper of the two relayed carriers)
DERP_PROTOCOL = "relay-tcp"


def derp_peer(server: Relay, target: int, connections: int) -> AbstractContextManager[Forwarder]:
    """The peer tunnel of :func:`peer` with both peers on loopback in ``relay-only`` mode:
    the relay (on loopback too) carries their session (issue 15 holds it to half the
    relayed tunnel's rate). Its processes count too: it does the work of a relayed one."""
    return peer(
        server, None, target, connections, protocol=DERP_PROTOCOL, mode="relay-only", path="derp"
    )
