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


#: the keyring library's own "no backend" (a headless server without a Secret Service)
NO_KEYRING = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def environment(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDBRIDGE_")}
    return {**clean, **extra}


def run_without_keyring(
    *args: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: str = "",
) -> subprocess.CompletedProcess[str]:
    """``cloudbridge ARGS`` to its end, on a machine without a keyring, in a clean
    environment plus ``env``."""
    return subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        env=environment(**NO_KEYRING, **(env or {})),
        input=stdin,
        cwd=cwd,
        check=False,
        timeout=30,
    )


def issue_token(
    state: Path, *permissions: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """A token from ``cloudbridge relay token issue`` for tenant acme, with relay:connect,
    tunnel:create and ``permissions``."""
    granted = ("relay:connect", "tunnel:create", *permissions)
    issued = subprocess.run(
        [
            *(BIN / "cloudbridge", "relay", "token", "issue", "--state-dir", str(state)),
            *("--tenant", "acme", "--subject", "laptop"),
            *(arg for permission in granted for arg in ("--permission", permission)),
        ],
        capture_output=True,
        check=False,  # the assertion below shows why it failed
        text=True,
        cwd=cwd,
        env=env if env is not None else environment(),
    )
    assert issued.returncode == 0, issued.stderr
    return issued.stdout.strip()


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
