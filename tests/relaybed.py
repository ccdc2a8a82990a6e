"""An in-process relay on loopback, and clients of it, for the end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.race import connect
from cloudbridge_core.config import Config, load_config, merged_schema
from cloudbridge_core.plugins import Plugins, load_plugins
from cloudbridge_core.relay.runner import RunningRelay, start_relay
from cloudbridge_core.relay.tokens import issue_token

BOTH = ["relay:connect", "tunnel:create"]


@dataclass
class Bed:
    relay: RunningRelay
    plugins: Plugins
    state_dir: Path
    transport: str = "tls"

    def token(
        self, tenant: str = "acme", permissions: list[str] = BOTH, ttl: float = 3600, **kw: Any
    ) -> str:
        state = self.relay.state
        return issue_token(
            state.signing_key,
            issuer=kw.pop("issuer", state.issuer),
            tenant=tenant,
            subject="laptop",
            permissions=permissions,
            ttl=ttl,
            **kw,
        )

    def client_config(self, token: str, **settings: Any) -> Config:
        """A client config for this relay; ``settings`` by dotted key (``p2p.expose``)."""
        overrides = {
            "relay.host": ("127.0.0.1", "test"),
            f"transport.{self.transport}.port": (
                self.relay.listeners[self.transport].port,
                "test",
            ),
            "relay.tls.ca_file": (str(self.state_dir / "ca.pem"), "test"),
            "auth.token": (token, "test"),
            "transport.mode": (self.transport, "test"),
            **{key: (value, "test") for key, value in settings.items()},
        }
        return load_config(
            None,
            environ={},
            overrides=overrides,
            schema=merged_schema(self.plugins.config_sections()),
        )

    async def connect(self, token: str | None = None, **settings: Any) -> RelayConnection:
        return await connect(self.client_config(token or self.token(), **settings), self.plugins)


@asynccontextmanager
async def relay_bed(tmp_path: Path, *, dev: bool = True, **server: Any) -> AsyncIterator[Bed]:
    plugins = load_plugins()
    overrides = {
        "server.state_dir": (str(tmp_path / "state"), "test"),
        "server.listen": ("127.0.0.1", "test"),
    }
    overrides.update({f"server.{k}": (v, "test") for k, v in server.items()})
    config = load_config(
        None, environ={}, overrides=overrides, schema=merged_schema(plugins.config_sections())
    )
    running = await start_relay(config, plugins, dev=dev, port_override=0)
    try:
        yield Bed(running, plugins, tmp_path / "state")
    finally:
        await running.aclose()


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for start in range(0, len(payload), 1 << 20):
            writer.write(payload[start : start + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = bytearray()
    while data := await reader.read(1 << 20):
        received += data
    await sender
    writer.close()
    await writer.wait_closed()
    return bytes(received)


def run(
    tmp_path: Path,
    scenario: Callable[[Bed], Awaitable[None]],
    transport: str = "tls",
    **server: Any,
) -> None:
    async def main() -> None:
        async with relay_bed(tmp_path, **server) as bed:
            bed.transport = transport
            await scenario(bed)

    asyncio.run(main())
