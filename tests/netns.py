"""A network namespace the test creates, joined to this one by a veth pair.

Addresses come from the benchmarking range 198.18.0.0/15 (never the machine's own
networks): this side is 198.19.N.1, the namespace 198.19.N.2. Processes started in it
are killed before it is deleted (``ip netns del`` leaves them running).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path


class Netns:
    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.name = f"cbt-{suffix}"
        self._host_link = f"cbh{suffix}"
        subnet = int(suffix, 16) % 250 + 1
        self.host_address = f"198.19.{subnet}.1"
        self.address = f"198.19.{subnet}.2"
        self._processes: list[subprocess.Popen[str]] = []
        self._drains: list[threading.Thread] = []

    def __enter__(self) -> Netns:
        ns_link = f"cbn{self.name[4:]}"
        for command in (
            f"ip netns add {self.name}",
            f"ip link add {self._host_link} type veth peer name {ns_link} netns {self.name}",
            f"ip addr add {self.host_address}/24 dev {self._host_link}",
            f"ip link set {self._host_link} up",
            f"ip -n {self.name} addr add {self.address}/24 dev {ns_link}",
            f"ip -n {self.name} link set {ns_link} up",
            f"ip -n {self.name} link set lo up",
        ):
            subprocess.run(command.split(), check=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self._processes:
            process.kill()
            process.wait()
        for drain in self._drains:
            drain.join(5)
        for process in self._processes:
            if process.stderr is not None:
                process.stderr.close()
        subprocess.run(["ip", "link", "del", self._host_link], check=False)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def spawn(
        self, command: Sequence[str | Path], *, ready: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start ``command`` in the namespace; return once it printed ``ready`` on stderr."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *map(str, command)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._processes.append(process)
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if ready in line:
                # keep draining, so that a chatty process never blocks on a full pipe
                drain = threading.Thread(target=process.stderr.read, daemon=True)
                drain.start()
                self._drains.append(drain)
                return process
        raise RuntimeError(f"{command[0]} exited before {ready!r}: {''.join(seen[-20:])}")

    def nft(self, rules: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules, text=True, check=True
        )
