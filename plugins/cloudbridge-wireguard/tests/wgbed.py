"""Namespaces, keys and overlay drivers for the WireGuard plugin's tests.

Every overlay runs in a child process entered into its namespace (``overlay_driver.py``),
driven through the plugin's hook. Names carry a random tag: the UAPI socket directory
(/var/run/wireguard) is shared by all namespaces, so interface names must be unique."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

DRIVER = Path(__file__).with_name("overlay_driver.py")
SOCKETS = Path("/var/run/wireguard")


def needs_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    for tool in ("ip", "wireguard-go", "nft", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (./dev installs it)")


def run(command: str, stdin: str | None = None) -> str:
    return subprocess.run(
        command.split(), check=True, input=stdin, text=True, capture_output=True
    ).stdout


@dataclass(frozen=True)
class Keys:
    private: str
    public: str

    @classmethod
    def generate(cls) -> Keys:
        key = X25519PrivateKey.generate()
        private = key.private_bytes_raw()
        public = key.public_key().public_bytes_raw()
        return cls(base64.b64encode(private).decode(), base64.b64encode(public).decode())


class DriverError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['type']}: {error['message']}")
        self.type = error["type"]
        self.code = error.get("code")
        self.message = error["message"]


class Driver:
    """One overlay_driver.py in a namespace."""

    def __init__(self, ns: str, prefix: Sequence[str] = (), env: dict[str, str] | None = None):
        self.ns = ns
        # a file, not a pipe: nothing blocks on it; closed by close()
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *prefix, sys.executable, str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.read() == "ready"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver in {self.ns} exited: {self.output()[-3000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise DriverError(answer["error"])
        return answer["ok"]

    def call(self, op: str, **arguments: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def up(self, name: str, addresses: list[str], keys: Keys, **settings: Any) -> dict[str, Any]:
        interface = {"name": name, "addresses": addresses, "private_key": keys.private}
        result: dict[str, Any] = self.call("up", interface=interface, settings=settings)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(DriverError, RuntimeError, OSError):
                self.call("down")
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self.log.close()


def peer(keys: Keys, address: str, endpoint: tuple[str, int] | None, **more: Any) -> dict[str, Any]:
    return {
        "public_key": keys.public,
        "allowed_ips": [f"{address}/32"],
        "endpoint": list(endpoint) if endpoint else None,
        **more,
    }


def ping(ns: str, address: str, count: int = 3) -> list[float]:
    """RTTs in ms of ``count`` pings from ``ns`` to ``address``; raises when none came back.
    The deadline leaves room for WireGuard's first handshake."""
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "ping",
            "-n",
            "-c",
            str(count),
            "-i",
            "0.2",
            "-w",
            "10",
            address,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", done.stdout)]
    if not rtts:
        raise AssertionError(f"no answer from {address} in {ns}: {done.stdout}{done.stderr}")
    return rtts


def pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def wireguard_go_serving(name: str) -> list[int]:
    """The wireguard-go processes started for interface ``name``, in any namespace."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"wireguard-go") and name.encode() in argv:
            found.append(int(proc.name))
    return found


def nft_table(ns: str, name: str) -> dict[str, Any] | None:
    """The overlay's nft table in ``ns`` as nft's JSON, or None when there is none."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", f"cb_{name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        return None
    table: dict[str, Any] = json.loads(done.stdout)
    return table


def rule_counters(table: dict[str, Any]) -> dict[str, int]:
    """Packets counted per chain of an overlay's nft table."""
    counted: dict[str, int] = {}
    for item in table["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        for expression in rule["expr"]:
            if "counter" in expression:
                chain = rule["chain"]
                counted[chain] = counted.get(chain, 0) + expression["counter"]["packets"]
    return counted


def link_exists(ns: str, name: str) -> bool:
    done = subprocess.run(["ip", "-n", ns, "link", "show", name], capture_output=True, check=False)
    return done.returncode == 0


@dataclass
class Pair:
    """Two namespaces joined by a veth (198.18.0.1 in ``a``, 198.18.0.2 in ``b``), each
    with an overlay driver; overlay addresses 100.96.0.1 and 100.96.0.2 in 100.96.0.0/16,
    and fd7a:cb::1 and fd7a:cb::2 in fd7a:cb::/48."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    keys: dict[str, Keys] = field(default_factory=dict)
    drivers: dict[str, Driver] = field(default_factory=dict)

    UNDERLAY: ClassVar[dict[str, str]] = {"a": "198.18.0.1", "b": "198.18.0.2"}
    OVERLAY: ClassVar[dict[str, str]] = {"a": "100.96.0.1", "b": "100.96.0.2"}
    OVERLAY6: ClassVar[dict[str, str]] = {"a": "fd7a:cb::1", "b": "fd7a:cb::2"}

    def ns(self, side: str) -> str:
        return f"cbwg{side}-{self.tag}"

    def name(self, side: str) -> str:
        return f"cbw{side}{self.tag}"  # 10 characters, unique on the host

    def build(self) -> None:
        for side in "ab":
            run(f"ip netns add {self.ns(side)}")
            run(f"ip -n {self.ns(side)} link set lo up")
        run(f"ip link add va netns {self.ns('a')} type veth peer name vb netns {self.ns('b')}")
        for side in "ab":
            run(f"ip -n {self.ns(side)} addr add {self.UNDERLAY[side]}/24 dev v{side}")
            run(f"ip -n {self.ns(side)} link set v{side} up")
            self.keys[side] = Keys.generate()

    def driver(self, side: str, **kwargs: Any) -> Driver:
        driver = Driver(self.ns(side), **kwargs)
        self.drivers.setdefault(side, driver)
        return driver

    def up(self, side: str, **settings: Any) -> dict[str, Any]:
        return self.drivers[side].up(
            self.name(side),
            [f"{self.OVERLAY[side]}/16", f"{self.OVERLAY6[side]}/48"],
            self.keys[side],
            **settings,
        )

    def peer_of(self, side: str, endpoint_port: int, **more: Any) -> dict[str, Any]:
        """``side`` as the other side's peer, reached at its underlay address."""
        return peer(
            self.keys[side],
            self.OVERLAY[side],
            (self.UNDERLAY[side], endpoint_port),
            **{"allowed_ips": [f"{self.OVERLAY[side]}/32", f"{self.OVERLAY6[side]}/128"], **more},
        )

    def connect(self) -> dict[str, dict[str, Any]]:
        """Both overlays up, each the other's peer; their states."""
        states = {side: self.up(side) for side in "ab"}
        for side, other in (("a", "b"), ("b", "a")):
            self.drivers[side].call(
                "peers", peers=[self.peer_of(other, states[other]["listen_port"])]
            )
        return states

    def close(self) -> None:
        for driver in self.drivers.values():
            driver.close()
        for side in "ab":
            ns = self.ns(side)
            for pid in pids_in(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        for side in "ab":
            (SOCKETS / f"{self.name(side)}.sock").unlink(missing_ok=True)


def wait_until(condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` (cheap, in another process) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
