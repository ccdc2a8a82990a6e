"""A real coturn on loopback that checks TURN REST API credentials (``use-auth-secret``), as
a relay's ``server.turn`` expects; plugins/cloudbridge-turn/tests/test_turn.py has its own
(the plugin's tests run without this directory)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def free_port_both_ways() -> int:
    """A port free for UDP and TCP alike (coturn listens on both)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@contextlib.contextmanager
def coturn_with_secret(tmp_path: Path, secret: str) -> Iterator[int]:
    """coturn on a free loopback port (yielded) accepting credentials made with ``secret``;
    loopback peers are allowed, as the peers of a test all live on loopback."""
    binary = shutil.which("turnserver")
    assert binary, "coturn is not installed (./dev test installs it)"
    port = free_port_both_ways()
    conf = tmp_path / "turnserver.conf"
    conf.write_text(
        f"use-auth-secret\nstatic-auth-secret={secret}\nrealm=cloudbridge.test\nfingerprint\n"
        f"no-cli\nallow-loopback-peers\nlistening-ip=127.0.0.1\nrelay-ip=127.0.0.1\n"
        f"listening-port={port}\nmin-port=49710\nmax-port=49900\nno-tls\nno-dtls\n"
        f"pidfile={tmp_path}/turn.pid\nuserdb={tmp_path}/turndb\nlog-file=stdout\nsimple-log\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert process.poll() is None, f"coturn exited with {process.returncode}"
            assert time.monotonic() < deadline, "coturn did not start in 30 s"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
