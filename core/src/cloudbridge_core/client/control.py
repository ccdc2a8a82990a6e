"""The running client's local control socket: other commands ask it how things are.

A Unix socket only the user can open (0600 in a 0700 directory); one JSON request line in,
one JSON response line out. ``cloudbridge status`` and ``cloudbridge tunnel list`` read
the client's state through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import platformdirs

from cloudbridge_core.errors import CloudBridgeError, ServerUnavailable, error_for_code

MAX_REQUEST = 4096
#: answers one request (its JSON object); may be a coroutine function
Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


def config_digest(config_path: Path) -> str:
    """A short name for one config file, for the files a client keeps per config."""
    return hashlib.sha256(str(config_path.resolve()).encode()).hexdigest()[:16]


def socket_for(config_path: Path | None) -> Path:
    """Where the client run with ``config_path`` answers: one socket per config file, so
    ``cloudbridge status --config C`` finds the ``cloudbridge tunnel --config C`` running."""
    with warnings.catch_warnings():  # without XDG_RUNTIME_DIR it says it uses /tmp/runtime-UID
        warnings.simplefilter("ignore")
        runtime = platformdirs.user_runtime_path("cloudbridge")
    if config_path is None:
        return runtime / "client.sock"
    return runtime / f"client-{config_digest(config_path)}.sock"


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> bool:
        """Listen; False (and nothing changed) when another client already answers there."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if await _answers(self.path):
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a client that did not stop cleanly
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old_umask)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line[:MAX_REQUEST]) if line else {}
            command = request.get("command") if isinstance(request, dict) else None
            handler = self._handlers.get(command) if isinstance(command, str) else None
            if handler is None:
                reply = {"error": {"code": "usage", "message": "unknown command"}}
            else:
                answer = handler(request)
                reply = await answer if inspect.isawaitable(answer) else answer
        except ValueError:
            reply = {"error": {"code": "usage", "message": "request is not JSON"}}
        except CloudBridgeError as error:
            reply = {"error": {"code": error.code, "message": error.message}}
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


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    return True


async def query(path: Path, command: str, **arguments: Any) -> dict[str, Any]:
    """Ask the running client; a clear error says what to do when none is running."""
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ServerUnavailable(
            f"no running cloudbridge client at {path}",
            hint="start one with 'cloudbridge tunnel --config ...' and pass the same --config",
        ) from exc
    writer.write(json.dumps({"command": command, **arguments}).encode() + b"\n")
    reply: dict[str, Any] = json.loads(await reader.readline())
    writer.close()
    if "error" in reply:
        raise error_for_code(reply["error"]["code"], reply["error"]["message"])
    return reply
