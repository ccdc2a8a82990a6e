"""Running the ``cloudbridge`` command as users do: a subprocess of the installed CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def environment(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDBRIDGE_")}
    return {**clean, **extra}


def start(
    *args: str, env: dict[str, str], ready: str, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Start a long-running command and wait until it prints the line saying it is ready."""
    process = subprocess.Popen(
        [BIN / "cloudbridge", *args], stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    assert process.stderr is not None
    for line in process.stderr:
        if ready in line:
            # keep draining, so that a chatty process never blocks on a full pipe
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    process.wait()
    process.stderr.close()
    pytest.fail(f"{args[0]} exited with {process.returncode} before printing {ready!r}")


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    assert process.stderr is not None
    process.stderr.close()
    return code


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while data := client.recv(65536):
            received += data
    return received
