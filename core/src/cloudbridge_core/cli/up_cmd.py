"""``cloudbridge up`` and ``cloudbridge down``: the client in the background.

``up`` starts the installed system service when there is one (systemd), else a detached
``cloudbridge p2p`` or ``tunnel`` (as the config says) logging to a file in the state
directory, its process id in a pid file beside it; then it asks the client's control
socket until the client says it is connected, and gives up after ``--timeout`` with the
reason (the client keeps trying in the background). ``down`` stops what ``up`` started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import platformdirs

from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.runtime import Runtime, config_option, runtime_of
from cloudbridge_core.cli.service_cmd import SYSTEMD_DIR
from cloudbridge_core.client.control import config_digest, query, socket_for
from cloudbridge_core.config import Config
from cloudbridge_core.errors import (
    CloudBridgeError,
    ConfigError,
    ConnectionTimeout,
    all_error_classes,
)
from cloudbridge_core.service.command import client_command
from cloudbridge_core.service.systemd import unit_name

#: how often ``up`` asks the client whether it is connected
POLL_INTERVAL = 0.2
#: how long ``down`` waits for the client to drain after SIGTERM
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Background:
    """Where the background client of one config keeps its files (absolute paths)."""

    pid_file: Path
    log_file: Path
    socket: Path

    @classmethod
    def of(cls, config_path: Path | None) -> Background:
        with warnings.catch_warnings():  # platformdirs warns when it falls back to a default
            warnings.simplefilter("ignore")
            state = platformdirs.user_state_path("cloudbridge").absolute()
        stem = f"client-{config_digest(config_path)}" if config_path else "client"
        return cls(state / f"{stem}.pid", state / f"{stem}.log", socket_for(config_path))

    def running_pid(self) -> int | None:
        """The recorded client's process id while it runs (not a reused id)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return None  # someone else's process took the number
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"cloudbridge" not in cmdline.read_bytes():
            return None
        return pid


def _installed_unit(config: Config) -> str | None:
    """The system service's unit when it is installed and systemd runs."""
    if not sys.platform.startswith("linux") or not Path("/run/systemd/system").is_dir():
        return None
    unit = unit_name(config)
    return unit if (SYSTEMD_DIR / unit).exists() else None


@click.command()
@config_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the client to connect.",
)
@click.pass_context
def up(ctx: click.Context, timeout: float) -> None:
    """Start the client in the background (the installed service, else a detached process)
    and return once it is connected."""
    runtime = runtime_of(ctx)
    config = runtime.config()  # an invalid config exits 3 before anything starts
    verb = client_command(config)
    unit = _installed_unit(config)
    if unit is not None:
        _systemctl("start", unit)
        config_path = runtime.config_path
        service_socket = Path("/run/cloudbridge") / socket_for(config_path).name
        message(f"started the service {unit}")
        _wait_connected(service_socket, timeout, None, f"journalctl -u {unit}")
        return
    background = Background.of(runtime.config_path)
    pid = background.running_pid()
    if pid is not None:
        message(f"already running (pid {pid}); 'cloudbridge down' stops it")
        _wait_connected(background.socket, timeout, None, str(background.log_file))
        return
    if _answers(background.socket):
        message(f"a client for this config already runs (it answers at {background.socket})")
        _wait_connected(background.socket, timeout, None, "its own output")
        return
    process = _spawn(runtime, verb, background)
    message(
        f"started 'cloudbridge {verb}' in the background (pid {process.pid}),"
        f" logging to {background.log_file}"
    )
    _wait_connected(background.socket, timeout, process, str(background.log_file))


def _answers(socket: Path) -> bool:
    try:
        asyncio.run(query(socket, "status"))
    except CloudBridgeError:
        return False
    return True


def _spawn(runtime: Runtime, verb: str, background: Background) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).parent / "cloudbridge")]
    environ = dict(os.environ)
    token_file = runtime.token_file.absolute() if runtime.token_file is not None else None
    token = runtime.overrides.get("auth.token")
    if token_file is not None:
        command += ["--token-file", str(token_file)]
    elif token is not None:  # --token or --token-stdin: through the environment, not argv
        environ["CLOUDBRIDGE_AUTH__TOKEN"] = str(token[0])
    command.append(verb)
    if runtime.config_path is not None:
        command += ["--config", str(runtime.config_path.absolute())]
    background.log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with background.log_file.open("ab") as log:
        os.chmod(background.log_file, 0o600)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environ,
            start_new_session=True,  # no Ctrl-C or hang-up from this terminal reaches it
        )
    background.pid_file.write_text(f"{process.pid}\n")
    return process


def _wait_connected(
    socket: Path, timeout: float, process: subprocess.Popen[bytes] | None, logs: str
) -> None:
    deadline = time.monotonic() + timeout
    reason = "its control socket does not answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise _exited(process.returncode, logs)
        try:
            reply = asyncio.run(query(socket, "status"))
        except CloudBridgeError:
            reply = None
        if reply is not None:
            if reply.get("state") == "connected":
                transport = reply.get("transport") or {}
                message(f"connected to {reply['relay']['host']} via {transport.get('name')}")
                return
            reason = reply.get("last_error") or f"state {reply.get('state')}"
        time.sleep(POLL_INTERVAL)
    if process is not None:
        reason = _last_said(logs, ("waiting for ", "error: ")) or reason
    raise ConnectionTimeout(
        f"not connected after {timeout:g}s: {reason}; the client keeps trying in the background",
        hint=f"see {logs}, or stop it with 'cloudbridge down'",
    )


def _last_said(logs: str, starts: tuple[str, ...]) -> str:
    """The last line of the client's log that starts with one of ``starts`` (what it told
    the person at the terminal: ``error: ...``, ``waiting for the relay: ...``)."""
    with contextlib.suppress(OSError):
        lines = Path(logs).read_text(errors="replace").splitlines()
        said = [line for line in lines if line.startswith(starts)]
        return said[-1] if said else ""
    return ""


def _exited(code: int, logs: str) -> CloudBridgeError:
    """The error the detached client exited with, from the last error line of its log."""
    text = _last_said(logs, ("error: ",)).removeprefix("error: ")
    named = text.rsplit("(", 1)[-1].rstrip(")") if text.endswith(")") else ""
    known = [c for c in all_error_classes() if c.code == named and c is not ConfigError]
    kind = known[0] if known else CloudBridgeError
    return kind(f"the client exited with {code}: {text or 'no output'}", hint=f"see {logs}")


@click.command()
@config_option
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the client that 'cloudbridge up' started (the service, or the detached process)."""
    runtime = runtime_of(ctx)
    config = runtime.config()
    unit = _installed_unit(config)
    if unit is not None:
        _systemctl("stop", unit)
        message(f"stopped the service {unit}")
        return
    background = Background.of(runtime.config_path)
    pid = background.running_pid()
    if pid is None:
        background.pid_file.unlink(missing_ok=True)
        message("no client started by 'cloudbridge up' is running for this config")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while background.running_pid() is not None and _alive(pid):
        if time.monotonic() > deadline:
            raise CloudBridgeError(
                f"the client (pid {pid}) did not stop within {STOP_TIMEOUT:g}s",
                hint=f"kill -9 {pid}",
            )
        time.sleep(POLL_INTERVAL)
    background.pid_file.unlink(missing_ok=True)
    message(f"stopped the client (pid {pid})")


def _alive(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie of ours counts as gone)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        waited = 0  # not our child: ask the kernel
    if waited == pid:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        if stat.read_text().split(") ", 1)[1].startswith("Z"):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _systemctl(verb: str, unit: str) -> None:
    done = subprocess.run(
        ["systemctl", verb, unit], capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode != 0:
        reason = done.stderr.strip() or f"exit {done.returncode}"
        raise CloudBridgeError(f"systemctl {verb} {unit} failed: {reason}")
