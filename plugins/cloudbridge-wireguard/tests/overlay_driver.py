"""Runs inside a test's network namespace (``ip netns exec NS python overlay_driver.py``):
drives one WireGuard overlay through the plugin's hook, and a UDP socket and TCP echo
for the traffic checks. One JSON command per line on stdin, one JSON answer per line
on stdout: ``{"ok": ...}`` or ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from typing import Any, TextIO

import uvloop
from cloudbridge_core.api import CloudBridgeError, Overlay, OverlayInterface, OverlayPeer
from cloudbridge_wireguard.hooks import cloudbridge_overlays
from cloudbridge_wireguard.wire import is_wireguard_message


class Driver:
    def __init__(self) -> None:
        self.overlay: Overlay | None = None
        self.udp: socket.socket | None = None
        self.udp_received: list[tuple[str, int, bytes]] = []
        self.tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.servers: list[asyncio.Server] = []

    async def load(self, settings: dict[str, Any]) -> None:
        (spec,) = cloudbridge_overlays()
        self.overlay = spec.load(settings)

    async def up(self, interface: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        await self.load(settings)  # a new overlay for each up, with these settings
        assert self.overlay is not None
        state = await self.overlay.up(OverlayInterface(**interface))
        return {
            "interface": state.interface,
            "backend": state.backend,
            "listen_port": state.listen_port,
        }

    async def peers(self, peers: list[dict[str, Any]]) -> None:
        assert self.overlay is not None
        await self.overlay.update_peers(
            [
                OverlayPeer(
                    **{**p, "endpoint": tuple(p["endpoint"]) if p.get("endpoint") else None}
                )
                for p in peers
            ]
        )

    async def status(self) -> dict[str, Any]:
        assert self.overlay is not None
        device = await self.overlay.status()  # type: ignore[attr-defined]
        return {
            "listen_port": device.listen_port,
            "peers": {
                key: {
                    "endpoint": peer.endpoint,
                    "allowed_ips": list(peer.allowed_ips),
                    "keepalive_seconds": peer.keepalive_seconds,
                    "rx_bytes": peer.rx_bytes,
                    "tx_bytes": peer.tx_bytes,
                    "last_handshake": peer.last_handshake,
                }
                for key, peer in device.peers.items()
            },
        }

    async def down(self) -> None:
        assert self.overlay is not None
        await self.overlay.down()

    # ---- traffic ----------------------------------------------------------------------

    async def udp_bind(self, port: int) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", port))  # noqa: S104 - as a NAT strategy's socket, in a test namespace
        self.udp.setblocking(False)
        asyncio.get_running_loop().add_reader(self.udp.fileno(), self._udp_readable)

    def _udp_readable(self) -> None:
        assert self.udp is not None
        while True:
            try:
                data, (host, port) = self.udp.recvfrom(65536)
            except BlockingIOError:
                return
            self.udp_received.append((host, port, data))

    async def udp_send(self, host: str, port: int, data: str) -> None:
        assert self.udp is not None
        self.udp.sendto(bytes.fromhex(data), (host, port))

    async def udp_stats(self) -> dict[str, Any]:
        return {
            "received": len(self.udp_received),
            "wireguard": sum(is_wireguard_message(d) for _h, _p, d in self.udp_received),
            "payloads": sorted({d.hex() for _h, _p, d in self.udp_received}),
            "sources": sorted({f"{h}:{p}" for h, p, _d in self.udp_received}),
        }

    async def tcp_echo(self, host: str, port: int) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        self.servers.append(await asyncio.start_server(serve, host, port))

    async def tcp_open(self, host: str, port: int) -> None:
        self.tcp = await asyncio.wait_for(asyncio.open_connection(host, port), 10)

    async def tcp_roundtrip(self, size: int) -> bool:
        assert self.tcp is not None
        reader, writer = self.tcp
        payload = os.urandom(size)
        writer.write(payload)
        await writer.drain()
        received = await asyncio.wait_for(reader.readexactly(size), 20)
        return received == payload


async def main(answers: TextIO) -> None:
    driver = Driver()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ok": "ready"}), file=answers, flush=True)
    while line := await reader.readline():
        command = json.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            result = await getattr(driver, op)(**command)
        except CloudBridgeError as error:
            answer: dict[str, Any] = {
                "error": {"type": type(error).__name__, "code": error.code, "message": str(error)}
            }
        except Exception as error:  # noqa: BLE001 - the test shows what escaped, by type
            answer = {"error": {"type": type(error).__name__, "message": repr(error)}}
        else:
            answer = {"ok": result}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    # answers keep the real stdout; logs (structlog prints) and the rest go to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # on the client's own loop: uvloop, which cannot make pyroute2's netlink endpoints
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(answers))
