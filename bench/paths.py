"""The paths the benchmark measures, each a forwarder from a local port to the target.

Every path is a context manager yielding a :class:`Forwarder`: the port the bench's clients
connect to, and the processes whose memory and CPU count as the path's cost. A reference
tool that cannot run here raises :class:`procs.Unavailable` with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
def socat(target: int) -> Iterator[Forwarder]:
    if not shutil.which("socat"):
        raise Unavailable("socat is not installed (apt-get install socat)")
    port = free_port()
    command = [
        "socat",
        f"TCP-LISTEN:{port},fork,reuseaddr,nodelay,backlog=4096,bind=127.0.0.1",
        f"TCP:127.0.0.1:{target},nodelay",
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


@dataclass
class Relay:
    pid: int
    state: str
    token: str


@contextmanager
def relay() -> Iterator[Relay]:
    """A CloudBridge relay on loopback serving every installed transport, and a client token."""
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as state:
        env = {
            **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(free_port()) for n in TRANSPORTS},
            "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
            "CLOUDBRIDGE_LOGGING__LEVEL": "warning",
        }
        with started(
            [str(BIN / "cloudbridge"), "relay", "serve", "--dev", "--state-dir", state],
            "client config:",
            env,
        ) as process:
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
