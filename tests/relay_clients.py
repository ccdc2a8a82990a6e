"""A running ``cloudbridge tunnel`` whose relay the tests follow through ``status``, and
the fixture starting them (``tunnel``, in conftest.py): for the tests of clients that know
several relays (tests/test_relay_hosts.py, tests/test_relay_names.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli_process import BIN, start, stop
from cloudbridge_core.config.schema import cli_schema
from jsonschema import Draft202012Validator
from loopback import free_port


@dataclass
class Client:
    process: subprocess.Popen[str]
    socket: Path
    env: dict[str, str]
    port: int

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            [BIN / "cloudbridge", "status", "--json", "--control-socket", str(self.socket)],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        document: dict[str, Any] = json.loads(done.stdout)
        Draft202012Validator(cli_schema("status")).validate(document)
        return document

    def on(self) -> str | None:
        """The relay the session is on (None while reconnecting)."""
        document = self.status()
        connected = document["relay"]["connected_to"]
        if document["state"] != "connected" or connected is None:
            return None
        return str(connected["host"])

    def wait_on(self, host: str, within: float = 30) -> dict[str, Any]:
        """Poll ``status`` until the session is on ``host``: a hang guard, not a measure."""
        deadline = time.monotonic() + within
        while self.on() != host:
            assert self.process.poll() is None, "the client exited"
            assert time.monotonic() < deadline, self.status()
            time.sleep(0.2)
        return self.status()


#: starts a tunnel client with an environment (its config) and extra flags
StartTunnel = Callable[..., Client]


def tunnel_clients(directory: Path, echo_port: int) -> Iterator[StartTunnel]:
    """Yields a function starting tunnel clients to ``echo_port``; stops them after."""
    started: list[Client] = []

    def run(env: dict[str, str], *flags: str) -> Client:
        local = free_port()
        control = directory / f"client-{len(started)}.sock"
        args = ("tunnel", "--local-port", str(local), "--remote-host", "127.0.0.1")
        process = start(
            *args,
            *("--remote-port", str(echo_port), "--control-socket", str(control)),
            *flags,
            env=env,
            ready="tunnel 127.0.0.1:",
        )
        started.append(Client(process, control, env, local))
        return started[-1]

    yield run
    for client in started:
        assert stop(client.process) == 0
