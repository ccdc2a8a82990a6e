"""The benchmark's target: a sink, a source and an echo on one port, in its own process.

A connection starts with a command byte; the first two take an 8-byte big-endian size:

- ``U`` size: read ``size`` bytes, then answer one byte (an upload is timed until it);
- ``D`` size: send ``size`` bytes, then read until the client closes (the client closes
  first, so a forwarder's handling of a close never shortens a download);
- ``E``: echo everything until the client closes (round trips, setups, idle connections).

A thread per connection with blocking sockets and 1 MiB buffers: recv_into and sendall
release the GIL, so the target moves several GB/s on loopback and is never what a forwarder
is measured against (direct TCP in the bench's table shows how far it goes). Threads are
reused: starting one for each of the setup rate's connections cost more than the rest of
the target's work on it.

    python target.py PORT [HOST]    # prints "ready" once it listens on HOST:PORT (127.0.0.1)
"""

from __future__ import annotations

import queue
import socket
import sys
import threading

BUFFER = 1 << 20
SOURCE = memoryview(bytes(range(256)) * (BUFFER // 256))


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed before the command was complete")
        data += chunk
    return data


def _sink(conn: socket.socket, size: int) -> None:
    buffer = bytearray(BUFFER)
    while size > 0:
        received = conn.recv_into(buffer, min(size, BUFFER))
        if not received:
            raise ConnectionError("closed before the upload was complete")
        size -= received
    conn.sendall(b"k")


def _source(conn: socket.socket, size: int) -> None:
    while size > 0:
        chunk = min(size, BUFFER)
        conn.sendall(SOURCE[:chunk])
        size -= chunk
    while conn.recv(BUFFER):
        pass


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def serve(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            command = conn.recv(1)
            if command == b"E":
                _echo(conn)
            elif command in (b"U", b"D"):
                size = int.from_bytes(_read_exactly(conn, 8), "big")
                (_sink if command == b"U" else _source)(conn, size)
        except OSError:
            # a reset or early close is the bench client's to report: it sees the short transfer
            return


class Workers:
    """Threads that serve one connection after another; a new one only when all are busy."""

    def __init__(self) -> None:
        self.waiting: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, conn: socket.socket) -> None:
        with self.lock:
            reuse = self.idle > 0
            if reuse:
                self.idle -= 1
        if reuse:
            self.waiting.put(conn)
        else:
            threading.Thread(target=self._work, args=(conn,), daemon=True).start()

    def _work(self, conn: socket.socket) -> None:
        while True:
            serve(conn)
            with self.lock:
                self.idle += 1
            conn = self.waiting.get()


def main() -> None:
    # thousands of idle connections each hold a thread; their stacks stay small
    threading.stack_size(256 << 10)
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    listener = socket.create_server((host, int(sys.argv[1])), backlog=4096)
    print("ready", flush=True)
    workers = Workers()
    while True:
        conn, _ = listener.accept()
        workers.submit(conn)


if __name__ == "__main__":
    main()
