"""Two hosts, each behind its own NAT router, and a "public" segment with the relay and a
coturn (STUN/TURN) server: all network namespaces the test creates (recipe and pitfalls
in ../shared/TESTBED.md).

    h1 (198.18.10.2) -- r1 [NAT] (203.0.113.11) --\\
                                                    wan (203.0.113.1, bridge): relay, coturn
    h2 (198.18.20.2) -- r2 [NAT] (203.0.113.12) --/

Each bed has its own namespace names, so beds never collide. Processes started in a
namespace are killed before it is deleted (``ip netns del`` leaves them running).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

WAN = "203.0.113.1"
ROUTER = {1: "203.0.113.11", 2: "203.0.113.12"}
#: the public addresses routers move to (:meth:`NatBed.move`)
MOVED = {1: "203.0.113.21", 2: "203.0.113.22"}
HOST = {1: "198.18.10.2", 2: "198.18.20.2"}

ROUTER_RULES = """
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" masquerade
  }}
}}
table ip filter {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{lan}" oifname "{wan}" accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{wan}" ct state new drop
  }}
}}
"""


def _drain(stream: IO[str], seen: list[str], log: Path | None) -> None:
    if log is None:
        stream.read()
        return
    with log.open("w") as kept:
        kept.writelines(seen)
        for line in stream:
            kept.write(line)
            kept.flush()


def run(command: str, stdin: str | None = None) -> None:
    subprocess.run(command.split(), check=True, input=stdin, text=True)


class NatBed:
    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.wan, self.routers, self.hosts = f"cbw{tag}", {}, {}
        for i in (1, 2):
            self.routers[i] = f"cbr{i}{tag}"
            self.hosts[i] = f"cbh{i}{tag}"
        self._tag = tag
        #: each router's public address now
        self.public = dict(ROUTER)
        self._processes: list[subprocess.Popen[str]] = []
        self._drains: list[threading.Thread] = []

    def __enter__(self) -> NatBed:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        tag = self._tag
        for ns in (self.wan, *self.routers.values(), *self.hosts.values()):
            run(f"ip netns add {ns}")
            run(f"ip -n {ns} link set lo up")
        run(f"ip -n {self.wan} link add br0 type bridge")
        run(f"ip -n {self.wan} addr add {WAN}/24 dev br0")
        run(f"ip -n {self.wan} link set br0 up")
        # without a default route coturn's sends to private candidates fail with ENETUNREACH
        # and coturn drops the whole allocation; on the internet they would just vanish
        run(f"ip -n {self.wan} route add default dev br0")
        for i in (1, 2):
            router, host = self.routers[i], self.hosts[i]
            wan_side, lan_side, bridge_side = f"r{i}w{tag}", f"r{i}l{tag}", f"w{i}{tag}"
            run(f"ip link add {wan_side} netns {router} type veth peer name {bridge_side}")
            run(f"ip link set {bridge_side} netns {self.wan}")
            run(f"ip -n {self.wan} link set {bridge_side} master br0 up")
            run(f"ip -n {router} addr add {ROUTER[i]}/24 dev {wan_side}")
            run(f"ip -n {router} link set {wan_side} up")
            run(f"ip link add {lan_side} netns {router} type veth peer name h{i}{tag} netns {host}")
            run(f"ip -n {router} addr add 198.18.{i}0.1/24 dev {lan_side}")
            run(f"ip -n {router} link set {lan_side} up")
            run(f"ip -n {host} addr add {HOST[i]}/24 dev h{i}{tag}")
            run(f"ip -n {host} link set h{i}{tag} up")
            run(f"ip -n {host} route add default via 198.18.{i}0.1")
            run(f"ip netns exec {router} sysctl -qw net.ipv4.ip_forward=1")
            run(f"ip netns exec {router} nft -f -", ROUTER_RULES.format(wan=wan_side, lan=lan_side))

    def block(self, name: str, rule: str) -> None:
        """Drop forwarded packets matching ``rule`` (nft syntax) in both routers."""
        for router in self.routers.values():
            run(
                f"ip netns exec {router} nft -f -",
                f"table ip {name} {{\n chain drop_them {{\n"
                f"  type filter hook forward priority -10; policy accept;\n"
                f"  {rule} drop\n }}\n}}\n",
            )

    def forget_mappings(self, i: int) -> None:
        """Router ``i`` loses every NAT mapping it holds (they expired, or it rebooted)."""
        subprocess.run(
            ["ip", "netns", "exec", self.routers[i], "conntrack", "-F"],
            check=True,
            capture_output=True,  # it says how many entries went, on stderr
        )

    def move(self, i: int, address: str) -> None:
        """Router ``i`` gets a new public address, as when the ISP hands a home router
        another one or a laptop moves to another network: the old address is gone, and
        with it every mapping it held (the kernel drops a masquerade's entries when its
        address goes; the flush takes the rest); new flows leave from ``address``."""
        router, wan_side = self.routers[i], f"r{i}w{self._tag}"
        run(f"ip -n {router} addr del {self.public[i]}/24 dev {wan_side}")
        run(f"ip -n {router} addr add {address}/24 dev {wan_side}")
        self.public[i] = address
        self.forget_mappings(i)

    def unblock(self, name: str) -> None:
        for router in self.routers.values():
            run(f"ip netns exec {router} nft delete table ip {name}")

    def spawn(
        self,
        ns: str,
        command: Sequence[str | Path],
        *,
        ready: str,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``command`` in ``ns``; return once it printed ``ready`` (stdout or stderr).
        ``log``: a file that keeps all it prints (else what follows ``ready`` is dropped)."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *map(str, command)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._processes.append(process)
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if ready in line:
                drain = threading.Thread(
                    target=_drain, args=(process.stdout, seen, log), daemon=True
                )
                drain.start()
                self._drains.append(drain)
                return process
        raise RuntimeError(f"{command[0]} exited before {ready!r}: {''.join(seen[-30:])}")

    def exec(self, ns: str, command: Sequence[str | Path], timeout: float = 60) -> str:
        """The command's stdout; its stderr is in the error when it fails."""
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *map(str, command)],
            capture_output=True,
            check=False,  # the error below carries its stderr
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(
                f"{' '.join(map(str, command))} in {ns} exited {done.returncode}: "
                + done.stderr.strip()[-2000:]
            )
        return done.stdout

    def __exit__(self, *exc_info: object) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for drain in self._drains:
            drain.join(5)
        for process in self._processes:
            if process.stdout is not None:
                process.stdout.close()
        for ns in (*self.hosts.values(), *self.routers.values(), self.wan):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
