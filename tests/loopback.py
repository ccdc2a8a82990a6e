"""Loopback helpers shared by the cross-package tests."""

from __future__ import annotations

import socket
import socketserver


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Echo(socketserver.BaseRequestHandler):
    """Sends back whatever arrives, until the peer half-closes."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
