"""A mesh of peers on a NatBed (natbed.py): the relay and a real coturn on the "public"
segment, a peer exposing an echo port behind one NAT and a peer tunnel to it from the
other, and what tests/test_p2p_nat.py and the bench's part "peers" (bench/peers.py) do
with it: read the peers' path, break and mend the direct path, carry data through the
tunnel. Needs root, iproute2, nftables and coturn (:func:`namespaces_work` says what is
missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from natbed import ROUTER, WAN, NatBed, run

BIN = Path(sys.executable).parent
TOOLS = Path(__file__).parent / "ns_tools.py"
ECHO_PORT, LOCAL_PORT = 7000, 7100
TURN_USER, TURN_PASSWORD = "alice", "s3cret-turn"
TURN_SECRET = "shared-by-relay-and-coturn"


def namespaces_work() -> str | None:
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "iproute2 and nftables are needed (./dev test installs them)"
    probe = subprocess.run(
        ["ip", "netns", "add", "cbprobe"], check=False, capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"network namespaces cannot be created here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "cbprobe"], check=False)
    return None


@dataclass
class Mesh:
    bed: NatBed
    tmp: Path
    relay: subprocess.Popen[str]
    relay_command: list[Any]
    relay_env: dict[str, str]

    def restart_relay(self) -> None:
        self.relay.terminate()
        assert self.relay.wait(30) == 0
        self.relay = self.bed.spawn(
            self.bed.wan, self.relay_command, ready="client config:", env=self.relay_env
        )

    def cloudbridge(self, *args: str) -> str:
        return subprocess.run(
            [BIN / "cloudbridge", *args], capture_output=True, text=True, check=True
        ).stdout

    def status(self, config: Path) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            self.cloudbridge("status", "--config", str(config), "--json")
        )
        return document

    def peer_path(self, config: Path) -> str | None:
        peers = self.status(config)["peers"]
        return peers[0]["path"] if peers and peers[0]["connected"] else None

    def wait_for_path(self, config: Path, path: str | set[str], within: float) -> float:
        """Seconds until the first peer's path is ``path`` (or one of them)."""
        wanted = {path} if isinstance(path, str) else path
        started = time.monotonic()
        while (seen := self.peer_path(config)) not in wanted:
            if time.monotonic() - started >= within:
                peers = self.status(config)["peers"]
                why = self.explain(config, peers[0]["name"]) if peers else "no peer"
                raise AssertionError(f"path {seen}, not {path}: {why}")
            time.sleep(0.2)
        return time.monotonic() - started

    def explain(self, config: Path, peer: str = "server") -> str:
        return self.cloudbridge("status", "--config", str(config), "--explain", peer)

    def paced_roundtrip(self, size: int, seconds: float) -> PacedTransfer:
        """A round trip through the peer tunnel that takes ``seconds``, started in h1."""
        return PacedTransfer(
            subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.bed.hosts[1], sys.executable, str(TOOLS)),
                    *("roundtrip", str(LOCAL_PORT), str(size), str(seconds)),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        )

    def roundtrip(self, size: int, seconds: float) -> tuple[str, str]:
        sent, received = self.bed.exec(
            self.bed.hosts[1],
            [sys.executable, TOOLS, "roundtrip", str(LOCAL_PORT), str(size), str(seconds)],
            timeout=120,
        ).split()
        return sent, received


@dataclass
class PacedTransfer:
    process: subprocess.Popen[str]

    def result(self) -> tuple[str, str]:
        """The sha256 of what was sent and of what came back."""
        output, _ = self.process.communicate(timeout=90)
        sent, received = output.split()
        return sent, received


#: quick heartbeats and upgrades, so that the tests see paths found and dropped in seconds
QUICK = {"heartbeat_interval": "1s", "heartbeat_timeout": "1s", "upgrade_interval": "3s"}


#: the second relay of a cluster (``start_mesh(cluster=True)``), beside the first on the wan
WAN2 = "203.0.113.2"
#: what relays of a cluster share (docs/cluster.md)
SHARED_STATE = ("ca.pem", "ca.key", "signing-key.pem", "signing-key.pub.pem", "reset.key")
REDIS_PORT = 6379


def cluster_env(address: str, member: str) -> dict[str, str]:
    """A relay of the cluster listening on ``address`` only (two share the wan's ports)."""
    prefix = "CLOUDBRIDGE_SERVER__CLUSTER__"
    return {
        "CLOUDBRIDGE_SERVER__LISTEN": address,
        "CLOUDBRIDGE_SERVER__PUBLIC_HOST": address,
        f"{prefix}BACKEND": "redis",
        f"{prefix}REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
        f"{prefix}MEMBER": member,
        f"{prefix}PRESENCE_TTL": "3s",
    }


def start_second_relay(bed: NatBed, tmp: Path, env: dict[str, str]) -> None:
    """A redis-server and a second relay on the wan (at :data:`WAN2`), sharing the first
    relay's key material: a cluster of two."""
    run(f"ip -n {bed.wan} addr add {WAN2}/24 dev br0")
    state = tmp / "relay2"
    state.mkdir(mode=0o700)
    for name in SHARED_STATE:
        shutil.copy2(tmp / "relay" / name, state / name)
    relay: list[Any] = [BIN / "cloudbridge", "relay", "serve", "--state-dir", state]
    second = {**env, **cluster_env(WAN2, "r2")}
    bed.spawn(bed.wan, relay, ready="client config:", env=second, log=tmp / "relay2.log")


def start_mesh(
    bed: NatBed,
    tmp: Path,
    *,
    turn: bool,
    issued_turn: bool = False,
    timings: dict[str, str] = QUICK,
    cluster: bool = False,
) -> tuple[Mesh, Path, Path, Path]:
    """The relay and coturn in the wan; ``server`` (exposing the echo port) in h2; a peer
    tunnel from ``laptop`` in h1; ``outsider``, of another tenant, in h1 too. ``turn``: the
    peers have coturn's long-term user in ``p2p.ice.turn_servers``; ``issued_turn``: coturn
    takes only the credentials the relay issues (``server.turn``); ``timings``: the peers'
    heartbeat and upgrade settings; ``cluster``: two relays sharing a Redis, ``server`` and
    ``outsider`` on the second."""
    turnserver = shutil.which("turnserver")
    assert turnserver, "coturn is not installed (./dev test installs it)"
    conf = tmp / "turnserver.conf"
    auth = (
        f"use-auth-secret\nstatic-auth-secret={TURN_SECRET}\n"
        if issued_turn
        else f"lt-cred-mech\nuser={TURN_USER}:{TURN_PASSWORD}\n"
    )
    conf.write_text(
        f"listening-ip={WAN}\nrelay-ip={WAN}\nlistening-port=3478\nmin-port=49160\n"
        f"max-port=49400\nrealm=cloudbridge.test\n{auth}"
        f"fingerprint\nno-tls\nno-dtls\nno-cli\npidfile={tmp}/turn.pid\nuserdb={tmp}/turndb\n"
        "log-file=stdout\nsimple-log\n"
    )
    bed.spawn(bed.wan, [turnserver, "-c", conf], ready="IO method (admin thread)")
    state = tmp / "relay"
    env = {"CLOUDBRIDGE_SERVER__PUBLIC_HOST": WAN, "CLOUDBRIDGE_METRICS__ENABLED": "false"}
    if issued_turn:
        secret_file = tmp / "turn.secret"
        secret_file.write_text(TURN_SECRET)
        secret_file.chmod(0o600)
        env["CLOUDBRIDGE_SERVER__TURN__SECRET_FILE"] = str(secret_file)
        env["CLOUDBRIDGE_SERVER__TURN__URLS"] = json.dumps([f"turn:{WAN}:3478"])
    if cluster:
        redis = shutil.which("redis-server")
        assert redis, "redis-server is not installed (./dev test installs it)"
        bed.spawn(
            bed.wan,
            [redis, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", ""],
            ready="Ready to accept connections",
        )
        env.update(cluster_env(WAN, "r1"))
    relay: list[Any] = [BIN / "cloudbridge", "relay", "serve", "--state-dir", state]
    started = bed.spawn(bed.wan, relay, ready="client config:", env=env, log=tmp / "relay.log")
    if cluster:
        start_second_relay(bed, tmp, env)
    mesh = Mesh(bed, tmp, started, relay, env)
    tokens = {
        tenant: mesh.cloudbridge(
            *("relay", "token", "issue", "--state-dir", str(state), "--tenant", tenant),
            *("--subject", "peer", "--permission", "relay:connect", "--permission", "p2p:mesh"),
        ).strip()
        for tenant in ("acme", "globex")
    }
    written = yaml.safe_load((state / "client.yaml").read_text())
    # STUN from the relay itself, as its client.yaml says
    ice: dict[str, Any] = dict(written["p2p"]["ice"])
    assert ice["stun_servers"] == [f"stun:{WAN}:19302"]
    if turn:
        ice["turn_servers"] = [
            {"url": f"turn:{WAN}:3478", "username": TURN_USER, "credential": TURN_PASSWORD}
        ]
    configs = []
    for name, expose, tenant in (
        ("laptop", [], "acme"),
        ("server", [ECHO_PORT], "acme"),
        ("outsider", [ECHO_PORT], "globex"),
    ):
        config = tmp / f"{name}.yaml"
        p2p: dict[str, Any] = {
            "name": name,
            "expose": expose,
            "ice": ice,
            **timings,
        }
        on_second = cluster and name != "laptop"
        relay_section = {**written["relay"], "host": WAN2} if on_second else written["relay"]
        document = {
            **written,
            "relay": relay_section,
            "auth": {"token": tokens[tenant]},
            "metrics": {"enabled": False},
            "p2p": p2p,
        }
        config.write_text(yaml.safe_dump(document))
        configs.append(config)
    laptop, server, outsider = configs
    bed.spawn(bed.hosts[2], [sys.executable, TOOLS, "echo", str(ECHO_PORT)], ready="echo ready")
    for host, config in ((2, server), (1, outsider)):
        p2p_command: list[str | Path] = [BIN / "cloudbridge", "p2p", "--config", config]
        bed.spawn(
            bed.hosts[host], p2p_command, ready="in the mesh as", log=config.with_suffix(".log")
        )
    bed.spawn(
        bed.hosts[1],
        [
            *(BIN / "cloudbridge", "tunnel", "--config", laptop, "--local-port", str(LOCAL_PORT)),
            *("--remote-peer", "server", "--remote-port", str(ECHO_PORT)),
        ],
        ready=f"tunnel 127.0.0.1:{LOCAL_PORT}",
        log=laptop.with_suffix(".log"),
    )
    return mesh, laptop, server, outsider


BETWEEN_PEERS = [
    f"meta l4proto udp ip daddr {{ {ROUTER[1]}, {ROUTER[2]} }}",
    f"meta l4proto udp ip saddr {{ {ROUTER[1]}, {ROUTER[2]} }}",
]


def block_between_peers(bed: NatBed) -> None:
    for index, rule in enumerate(BETWEEN_PEERS):
        bed.block(f"peers{index}", rule)


def unblock_between_peers(bed: NatBed) -> None:
    for index in range(len(BETWEEN_PEERS)):
        bed.unblock(f"peers{index}")


def path_changes(mesh: Mesh, config: Path) -> list[dict[str, Any]]:
    explained = mesh.cloudbridge("status", "--config", str(config), "--explain", "server", "--json")
    changes: list[dict[str, Any]] = json.loads(explained)["path_changes"]
    return changes
