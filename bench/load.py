"""The benchmark's clients: what it sends through a path to the target (target.py) and times.

Blocking sockets, a thread per connection and 1 MiB buffers, like the target, so that the
clients cost little beside the forwarder they measure.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from dataclasses import dataclass

BUFFER = 1 << 20
PAYLOAD = memoryview(bytes(BUFFER))
#: a round trip's request and answer (issue 15's RTT figure)
MESSAGE = b"x" * 64


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


@dataclass
class Transfers:
    """What a set of parallel transfers moved."""

    moved: int
    seconds: float
    completed: int
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.moved / self.seconds


class _Transfer:
    def __init__(self, port: int, direction: str, size: int, timeout: float) -> None:
        self.port, self.direction, self.size, self.timeout = port, direction, size, timeout
        self.moved = 0
        self.done = False
        self.error = ""
        self.sock: socket.socket | None = None

    def run(self) -> None:
        try:
            with _connect(self.port, self.timeout) as sock:
                self.sock = sock
                command = b"U" if self.direction == "up" else b"D"
                sock.sendall(command + self.size.to_bytes(8, "big"))
                if self.direction == "up":
                    self._upload(sock)
                else:
                    self._download(sock)
            self.done = True
        except OSError as error:
            self.error = f"{type(error).__name__}: {error}"

    def _upload(self, sock: socket.socket) -> None:
        while self.moved < self.size:
            chunk = min(BUFFER, self.size - self.moved)
            sock.sendall(PAYLOAD[:chunk])
            self.moved += chunk
        if sock.recv(1) != b"k":
            raise ConnectionError(f"no acknowledgement after {self.size} bytes up")

    def _download(self, sock: socket.socket) -> None:
        buffer = bytearray(BUFFER)
        while self.moved < self.size:
            received = sock.recv_into(buffer, min(BUFFER, self.size - self.moved))
            if not received:
                raise ConnectionError(f"closed after {self.moved} of {self.size} bytes down")
            self.moved += received


def transfers(port: int, directions: list[str], size: int, timeout: float) -> Transfers:
    """Run one transfer of ``size`` bytes per entry of ``directions`` ("up" or "down") at once.

    Transfers still running after ``timeout`` seconds are cut (their sockets shut down) and
    count as not completed; what they moved still counts towards the rate.
    """
    jobs = [_Transfer(port, direction, size, timeout) for direction in directions]
    threads = [threading.Thread(target=job.run, daemon=True) for job in jobs]
    begin = time.perf_counter()
    deadline = begin + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    seconds = time.perf_counter() - begin
    for job, thread in zip(jobs, threads, strict=True):
        if thread.is_alive() and job.sock is not None:
            # wakes the blocked thread: it ends with an error, counted as not completed
            job.sock.shutdown(socket.SHUT_RDWR)
    for thread in threads:
        thread.join()
    errors = [f"{job.direction}: {job.error}" for job in jobs if job.error]
    return Transfers(
        moved=sum(job.moved for job in jobs),
        seconds=seconds,
        completed=sum(job.done for job in jobs),
        errors=errors,
    )


def round_trips(port: int, count: int, timeout: float) -> tuple[float, float]:
    """p50 and p99 (seconds) of ``count`` 64-byte request/response round trips on one connection."""
    samples = []
    with _connect(port, timeout) as sock:
        sock.sendall(b"E")
        for index in range(count + count // 10):
            begin = time.perf_counter()
            sock.sendall(MESSAGE)
            _read_exactly(sock, len(MESSAGE))
            # the first tenth warms the path up (buffers, caches, a lazily built codec)
            if index >= count // 10:
                samples.append(time.perf_counter() - begin)
    quantiles = statistics.quantiles(samples, n=100, method="inclusive")
    return quantiles[49], quantiles[98]


def setup_rate(port: int, count: int, timeout: float) -> float:
    """Connections a second, one after another, each carrying one byte to the target and back."""
    begin = time.perf_counter()
    for _ in range(count):
        with _connect(port, timeout) as sock:
            sock.sendall(b"E!")
            _read_exactly(sock, 1)
    return count / (time.perf_counter() - begin)


def open_idle(port: int, count: int, timeout: float) -> list[socket.socket]:
    """``count`` connections that have each carried one byte to the target and back.

    Raises:
        OSError: a connection failed; the message says how many were open.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _connect(port, timeout)
            held.append(sock)
            sock.sendall(b"E!")
            _read_exactly(sock, 1)
    except OSError as error:
        close_all(held)
        raise OSError(f"connection {len(held)} of {count} failed: {error}") from error
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
