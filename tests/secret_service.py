"""A real, headless Secret Service: a private D-Bus session bus with gnome-keyring-daemon's
secrets component on it, its login collection unlocked by a test-only password."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

UNLOCK_PASSWORD = b"test-only-keyring-password"


@contextlib.contextmanager
def secret_service(home: Path) -> Iterator[dict[str, str]]:
    """Yield the environment variables that lead keyring (and secret-tool) to it."""
    for tool in ("dbus-daemon", "gnome-keyring-daemon", "secret-tool"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is missing: ./dev test installs it (gnome-keyring, libsecret-tools)"
            )
    # short: the client's control socket goes there too, and AF_UNIX paths are limited
    runtime = Path(tempfile.mkdtemp(prefix="cb-run-"))
    env = {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1", "--nopidfile"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
    )
    daemon_pid: int | None = None
    try:
        assert bus.stdout is not None
        env["DBUS_SESSION_BUS_ADDRESS"] = bus.stdout.readline().strip()
        subprocess.run(
            ["gnome-keyring-daemon", "--unlock", "--components=secrets", "--daemonize"],
            input=UNLOCK_PASSWORD,
            capture_output=True,
            env={**os.environ, **env},
            timeout=30,
            check=True,
        )
        daemon_pid = _daemon_pid(env["DBUS_SESSION_BUS_ADDRESS"])
        yield env
    finally:
        # gnome-keyring-daemon can outlive its bus: stop it explicitly
        if daemon_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon_pid, signal.SIGTERM)
        bus.terminate()
        bus.communicate(timeout=10)  # reaps it and closes the pipe
        shutil.rmtree(runtime, ignore_errors=True)


def _daemon_pid(bus_address: str) -> int | None:
    """The gnome-keyring-daemon serving this bus (it daemonized, so it is not our child)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "gnome-keyring-d":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"DBUS_SESSION_BUS_ADDRESS={bus_address}".encode() in environ:
            return int(entry.name)
    return None
