"""A cluster on loopback: a real redis-server and relay processes sharing it, relay N
listening on 127.0.0.N (Linux answers all of 127/8 on loopback, so every relay has the same
ports), with the key material of relay 1 (CA, signing key, reset key) copied to the others
as docs/cluster.md says; and clients of it."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cli_process import BIN, NO_KEYRING, environment, start, stop
from loopback import free_port
from redis_server import RedisServer, redis_server

#: the transports the cluster tests use (the others' handshakes only cost time here)
PLUGINS_OFF = "quic,grpc"
SHARED = ("ca.pem", "ca.key", "signing-key.pem", "signing-key.pub.pem", "reset.key")


def host(index: int) -> str:
    return f"127.0.0.{index}"


@dataclass
class ClusterBed:
    home: Path
    redis: RedisServer
    ports: dict[str, int]
    #: settings under ``server`` every relay has
    server: dict[str, Any] = field(default_factory=dict)
    relays: dict[int, subprocess.Popen[str]] = field(default_factory=dict)

    def state(self, index: int) -> Path:
        return self.home / f"r{index}"

    def relay_config(self, index: int) -> Path:
        path = self.home / f"r{index}.yaml"
        document = {
            "server": {
                "listen": host(index),
                "public_host": host(index),
                "stun_port": self.ports["stun"],
                **self.server,
                "cluster": {
                    "backend": "redis",
                    "redis_url": self.redis.url,
                    "member": f"r{index}",
                    "link_port": self.ports["link"],
                    "presence_ttl": "3s",
                },
            },
            "transport": {name: {"port": self.ports[name]} for name in ("tls", "websocket")},
            "metrics": {"prometheus_port": self.metrics_port(index)},
            # a file of JSON lines: the tests read the relay's log events while it runs
            "logging": {"format": "json", "output": str(self.log(index))},
        }
        path.write_text(yaml.safe_dump(document))
        return path

    def log(self, index: int) -> Path:
        return self.home / f"r{index}.log"

    def logged(self, index: int) -> list[str]:
        """The events relay ``index`` has logged so far (every run of it), oldest first."""
        if not self.log(index).exists():
            return []
        lines = self.log(index).read_text().splitlines()
        return [json.loads(line)["event"] for line in lines if line.startswith("{")]

    def metrics_port(self, index: int) -> int:
        return self.ports.setdefault(f"metrics{index}", free_port())

    def probe(self, index: int, path: str = "/healthz") -> str:
        """What relay ``index`` answers on ``path`` of its metrics port."""
        url = f"http://127.0.0.1:{self.metrics_port(index)}{path}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())

    def start_relay(self, index: int) -> None:
        """Start relay ``index`` (the first one makes the cluster's key material)."""
        state = self.state(index)
        if index != 1 and not state.exists():
            state.mkdir(mode=0o700)
            for name in SHARED:
                shutil.copy2(self.state(1) / name, state / name)
        self.relays[index] = start(
            *("relay", "serve", "--dev", "--config", str(self.relay_config(index))),
            *("--state-dir", str(state)),
            env=environment(CLOUDBRIDGE_DISABLE_PLUGINS=PLUGINS_OFF),
            ready="client config:",
        )

    def kill_relay(self, index: int) -> None:
        process = self.relays.pop(index)
        process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()

    def stop_relay(self, index: int) -> None:
        assert stop(self.relays.pop(index)) == 0

    def cloudbridge(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "cloudbridge", *args],
            capture_output=True,
            text=True,
            env=environment(CLOUDBRIDGE_DISABLE_PLUGINS=PLUGINS_OFF, **NO_KEYRING, **env),
            check=False,
            timeout=60,
        )

    def token(self, tenant: str, subject: str, *permissions: str, at: int = 1) -> str:
        """A token issued with relay ``at``'s state directory: every member holds the
        cluster's one signing key, so any of them may issue it."""
        granted = permissions or ("relay:connect", "tunnel:create", "p2p:mesh")
        issued = self.cloudbridge(
            *("relay", "token", "issue", "--state-dir", self.state(at)),
            *("--tenant", tenant, "--subject", subject),
            *(arg for permission in granted for arg in ("--permission", permission)),
        )
        assert issued.returncode == 0, issued.stderr
        return issued.stdout.strip()

    def client_config(self, name: str, token: str, relays: list[int], **p2p: Any) -> Path:
        """A client of the relays ``relays`` (relay.hosts when more than one)."""
        hosts = [host(index) for index in relays]
        relay: dict[str, Any] = {
            "host": hosts[0],
            "tls": {"ca_file": str(self.state(1) / "ca.pem")},
        }
        if len(hosts) > 1:
            relay["hosts"] = hosts
        document = {
            "relay": relay,
            "auth": {"token": token},
            "transport": {n: {"port": self.ports[n]} for n in ("tls", "websocket")},
            "plugins": {"disabled": ["quic", "grpc"]},
            "metrics": {"enabled": False},
            "p2p": {"name": name, "heartbeat_interval": "1s", "heartbeat_timeout": "1s", **p2p},
        }
        path = self.home / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    def redis_sessions(self, tenant: str) -> list[str]:
        """The sessions the cluster counts for ``tenant`` now: the unexpired entries of its
        sorted set in Redis (scored by expiry, Unix seconds)."""
        listed = subprocess.run(
            [
                *("redis-cli", "-p", str(self.redis.port), "zrangebyscore"),
                *(f"cloudbridge:sessions:{tenant}", str(time.time()), "+inf"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return listed.stdout.split()

    def status(self, config: Path) -> dict[str, Any]:
        shown = self.cloudbridge("status", "--config", str(config), "--json")
        assert shown.returncode == 0, shown.stderr
        document: dict[str, Any] = json.loads(shown.stdout)
        return document


@contextlib.contextmanager
def cluster_bed(home: Path, relays: int = 2, **server: Any) -> Iterator[ClusterBed]:
    """Redis and ``relays`` relays (with ``server`` settings), stopped at the end."""
    with redis_server(home) as redis:
        ports = {name: free_port() for name in ("tls", "websocket", "stun", "link")}
        bed = ClusterBed(home, redis, ports, server)
        try:
            for index in range(1, relays + 1):
                bed.start_relay(index)
            yield bed
        finally:
            for index in list(bed.relays):
                bed.kill_relay(index)


def until(condition: Callable[[], object], within: float, what: str) -> None:
    """Poll ``condition`` until it holds: a hang guard, not a measured bound."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within:g}s"
        time.sleep(0.2)
