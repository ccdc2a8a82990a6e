"""Loopback helpers shared by the cross-package tests."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def echo(connection: socket.socket) -> None:
    """Sends back whatever arrives, until the peer half-closes (or resets: tests do)."""
    try:
        while data := connection.recv(65536):
            connection.sendall(data)
    except (ConnectionResetError, BrokenPipeError):
        return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    # a handler may never end (an endless source): closing must not wait for it
    block_on_close = False
    request_queue_size = 128


@contextmanager
def serving(handle: Callable[[socket.socket], object]) -> Iterator[int]:
    """A listener on loopback whose connections each run ``handle`` in a thread of their
    own, while the block lasts; yields its port.

    The accepting thread is stopped before the listener's descriptor is released: a thread
    left blocked in ``accept()`` on a closed listener went on accepting from later tests'
    sockets that reused the descriptor's number, and answered them with the wrong behaviour.
    """

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            handle(self.request)

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
