"""A real redis-server on a free loopback port, for the tests of a relay cluster: stopped
(or killed) and started again on the same port to play an outage. Without redis-server the
tests skip (``./dev test`` installs it); in CI they fail, as a missing install step should."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS-only server: its certificate and key, and the CA it trusts."""

    certificate: Path
    key: Path
    ca: Path


class RedisServer:
    """``redis-server`` without persistence, requiring ``password`` when one is given, and
    speaking only TLS (``rediss://``, clients unauthenticated) with ``tls``."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = _free_port()
        self.password = password
        self.tls = tls
        self._binary = binary
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self._binary, "--bind", "127.0.0.1"]
        if self.tls:
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(self.tls.certificate)]
            command += ["--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca)]
        else:
            command += ["--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self._directory)]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while not _listening(self.port):
            assert self._process.poll() is None, f"redis-server exited ({self._process.returncode})"
            assert time.monotonic() < deadline, "redis-server did not start in 30 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._process = None

    def kill(self) -> None:
        """``kill -9``: gone at once, mid-command, as a crashed or lost Redis host is."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@contextlib.contextmanager
def redis_server(
    directory: Path, password: str | None = None, tls: TlsFiles | None = None
) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        assert not os.environ.get("CI"), "redis-server is not installed (./dev test installs it)"
        pytest.skip("redis-server is not installed (./dev test installs it)")
    server = RedisServer(binary, directory, password, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
