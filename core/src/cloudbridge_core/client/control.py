"""The running client's local control socket: other commands ask it how things are.

A Unix socket only the user can open (0600 in a 0700 directory); one JSON request line in,
one JSON response line out. ``cloudbridge status`` and ``cloudbridge tunnel list`` read
the client's state through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import platformdirs

from cloudbridge_core.errors import CloudBridgeError, ServerUnavailable

MAX_REQUEST = 4096
Handler = Callable[[], dict[str, Any]]


def socket_for(config_path: Path | None) -> Path:
    """Where the client run with ``config_path`` answers: one socket per config file, so
    ``cloudbridge status --config C`` finds the ``cloudbridge tunnel --config C`` running."""
    with warnings.catch_warnings():  # without XDG_RUNTIME_DIR it says it uses /tmp/runtime-UID
        warnings.simplefilter("ignore")
        runtime = platformdirs.user_runtime_path("cloudbridge")
    if config_path is None:
        return runtime / "client.sock"
    digest = hashlib.sha256(str(config_path.resolve()).encode()).hexdigest()[:16]
    return runtime / f"client-{digest}.sock"


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a client that did not stop cleanly
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old_umask)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line[:MAX_REQUEST]) if line else {}
            command = request.get("command") if isinstance(request, dict) else None
            handler = self._handlers.get(command) if isinstance(command, str) else None
            reply = (
                handler() if handler else {"error": {"code": "usage", "message": "unknown command"}}
            )
        except ValueError:
            reply = {"error": {"code": "usage", "message": "request is not JSON"}}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def query(path: Path, command: str) -> dict[str, Any]:
    """Ask the running client; a clear error says what to do when none is running."""
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ServerUnavailable(
            f"no running cloudbridge client at {path}",
            hint="start one with 'cloudbridge tunnel --config ...' and pass the same --config",
        ) from exc
    writer.write(json.dumps({"command": command}).encode() + b"\n")
    reply: dict[str, Any] = json.loads(await reader.readline())
    writer.close()
    if "error" in reply:
        raise CloudBridgeError(reply["error"]["message"])
    return reply
