"""Processes for the benchmark: start one and wait until it is ready, and read what it costs.

Memory and CPU come from /proc (Linux only), summed over a process and its descendants so
that forking forwarders (socat, sshd) are counted whole.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
#: a plain echo service (the floods' bystander talks to it without the target's command byte)
ECHO = """
import asyncio, sys
async def echo(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""
_TCP_LISTEN = "0A"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Unavailable(Exception):
    """A path that cannot run here; the message says why (its column is skipped)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """``pid`` and its descendants (those that have not exited)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return []
    found = [pid]
    for child in children:
        found += children_of(int(child))
    return found


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        # a zombie (an exited child not yet reaped) has no VmRSS line: it holds no memory
        sizes = [
            int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")
        ]
        total += sum(sizes)
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of ``pids`` and their descendants.

    PSS rather than RSS: a forked child (socat's, sshd's) shares its parent's pages, and
    summing RSS would count them once per child.
    """
    total = 0
    for pid in {p for root in pids for p in children_of(root)}:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(
            int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")
        )
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` and their descendants, reaped ones included.

    Each live process counts its own time and that of the children it has reaped
    (cutime, cstime), so a child that exits between two readings is counted once.
    """
    ticks = 0
    for pid in {p for root in pids for p in children_of(root)}:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # the command name (field 2) may hold spaces; the fields after it are plain numbers
        fields = stat.rsplit(")", 1)[1].split()
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / _CLOCK_TICKS


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from /proc: no probe connection,
    which a forwarder would carry to the target)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == _TCP_LISTEN:
            return True
    return False


class _Output:
    """Drains a process's output so that it never blocks on a full pipe; keeps the tail."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.tail: collections.deque[str] = collections.deque(maxlen=20)

    def until(self, ready: str) -> bool:
        for line in self.stream:
            self.tail.append(line)
            if ready in line:
                return True
        return False

    def drain(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.stream:
            self.tail.append(line)

    def text(self) -> str:
        return "".join(self.tail).strip()


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _spawn(command: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )


@contextmanager
def started(
    command: list[str], ready: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` until the context ends, once it has printed a line containing ``ready``."""
    process = _spawn(command, env)
    output = _Output(process)
    try:
        if not output.until(ready):
            raise RuntimeError(f"{command[0]} exited before it was ready: {output.text()}")
        output.drain()
        yield process
    finally:
        _stop(process)


@contextmanager
def serving(
    command: list[str], port: int, env: dict[str, str] | None = None, timeout: float = 20.0
) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` until the context ends, once something listens on ``port``.

    Raises:
        Unavailable: the command exited, or nothing listened within ``timeout``; the
            message holds the end of its output.
    """
    process = _spawn(command, env)
    output = _Output(process)
    output.drain()
    try:
        deadline = time.monotonic() + timeout
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"{Path(command[0]).name} did not listen: {output.text()}")
            time.sleep(0.05)
        yield process
    finally:
        _stop(process)
