"""WireGuard's cross-platform userspace API (UAPI): the text protocol wireguard-go speaks
on ``/var/run/wireguard/<interface>.sock``.

A request is ``get=1`` or ``set=1`` followed by ``key=value`` lines and an empty line;
the answer is ``key=value`` lines ending with ``errno=N`` and an empty line. Keys travel
in hex. Encoding and parsing are sans-IO; :class:`Uapi` does the socket exchange.
Reference: https://www.wireguard.com/xplatform/
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cloudbridge_core.api import OverlayFailed, OverlayPeer

from cloudbridge_wireguard.wire import decode_key

SOCKET_DIR = Path("/var/run/wireguard")
#: what one answer may hold (a device with a thousand peers takes about 400 kB)
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: how long wireguard-go may take to answer one request
TIMEOUT = 5.0


def socket_path(interface: str) -> Path:
    return SOCKET_DIR / f"{interface}.sock"


class UapiError(Exception):
    """wireguard-go answered ``errno=N`` (N > 0) to a request."""

    def __init__(self, errno: int) -> None:
        errno = abs(errno)  # wireguard-go answers -errno (errno=-98 for EADDRINUSE)
        super().__init__(f"errno {errno} ({os.strerror(errno)})")
        self.errno = errno


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer as the device reports it. ``last_handshake`` is seconds since the epoch
    (0: never)."""

    public_key: str
    endpoint: tuple[str, int] | None = None
    allowed_ips: tuple[str, ...] = ()
    keepalive_seconds: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    listen_port: int
    peers: Mapping[str, PeerStatus] = field(default_factory=dict)


# ---- sans-IO ---------------------------------------------------------------------------


def hex_key(value: str, what: str) -> str:
    return decode_key(value, what).hex()


def format_endpoint(host: str, port: int) -> str:
    """``host:port`` as UAPI wants it (IPv6 in brackets); ``host`` must be an address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise OverlayFailed(f"peer endpoint {host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise OverlayFailed(f"peer endpoint port {port} is out of range")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def peer_lines(peer: OverlayPeer, *, existing: bool) -> list[tuple[str, str]]:
    """The lines that make the device hold ``peer`` as given. For a peer it already has
    (``existing``) this only updates: its session, and the connections inside, stay."""
    lines = [("public_key", hex_key(peer.public_key, f"peer key {peer.public_key!r}"))]
    if existing:
        lines.append(("update_only", "true"))
    if peer.endpoint is not None:
        lines.append(("endpoint", format_endpoint(*peer.endpoint)))
    lines.append(("persistent_keepalive_interval", str(max(0, int(peer.keepalive_seconds)))))
    lines.append(("replace_allowed_ips", "true"))
    for network in peer.allowed_ips:
        try:
            lines.append(("allowed_ip", str(ipaddress.ip_network(network, strict=False))))
        except ValueError:
            raise OverlayFailed(f"peer allowed IP {network!r} is not a network") from None
    return lines


def removal_lines(public_key: str) -> list[tuple[str, str]]:
    return [("public_key", hex_key(public_key, f"peer key {public_key!r}")), ("remove", "true")]


def encode_set(lines: Iterable[tuple[str, str]]) -> bytes:
    body = "".join(f"{key}={value}\n" for key, value in lines)
    return f"set=1\n{body}\n".encode()


GET = b"get=1\n\n"


def answer_errno(text: str) -> int:
    """The ``errno`` an answer ends with (a missing one counts as EPROTO)."""
    for line in reversed(text.splitlines()):
        if line.startswith("errno="):
            return int(line[6:])
    return 71  # EPROTO


def parse_get(text: str) -> DeviceStatus:
    """The device a ``get`` answer describes. The private key it also carries is
    skipped, never kept."""
    listen_port = 0
    peers: dict[str, PeerStatus] = {}
    current: _PeerBuilder | None = None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "public_key":
            if current is not None:
                peers[current.public_key] = current.build()
            current = _PeerBuilder(base64.b64encode(bytes.fromhex(value)).decode())
        elif current is not None:
            current.take(key, value)
        elif key == "listen_port":
            listen_port = int(value)
    if current is not None:
        peers[current.public_key] = current.build()
    return DeviceStatus(listen_port=listen_port, peers=peers)


@dataclass(slots=True)
class _PeerBuilder:
    public_key: str
    endpoint: tuple[str, int] | None = None
    allowed_ips: list[str] = field(default_factory=list)
    keepalive_seconds: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    handshake_sec: int = 0
    handshake_nsec: int = 0

    def take(self, key: str, value: str) -> None:
        if key == "endpoint":
            self.endpoint = parse_endpoint(value)
        elif key == "allowed_ip":
            self.allowed_ips.append(value)
        elif key == "persistent_keepalive_interval":
            self.keepalive_seconds = int(value)
        elif key == "rx_bytes":
            self.rx_bytes = int(value)
        elif key == "tx_bytes":
            self.tx_bytes = int(value)
        elif key == "last_handshake_time_sec":
            self.handshake_sec = int(value)
        elif key == "last_handshake_time_nsec":
            self.handshake_nsec = int(value)

    def build(self) -> PeerStatus:
        return PeerStatus(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=tuple(self.allowed_ips),
            keepalive_seconds=self.keepalive_seconds,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            last_handshake=self.handshake_sec + self.handshake_nsec / 1e9,
        )


# ---- I/O -------------------------------------------------------------------------------


class Uapi:
    """Requests to one wireguard-go device. Every failure is an :class:`OverlayFailed`
    or, when wireguard-go refused a ``set``, a :class:`UapiError`."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.path = socket_path(interface)

    async def get(self) -> DeviceStatus:
        answer = await self._exchange(GET)
        errno = answer_errno(answer)
        if errno:
            raise OverlayFailed(f"wireguard-go ({self.interface}) failed a get: errno {errno}")
        return parse_get(answer)

    async def set(self, lines: Sequence[tuple[str, str]]) -> None:
        errno = answer_errno(await self._exchange(encode_set(lines)))
        if errno:
            raise UapiError(errno)

    async def _exchange(self, request: bytes) -> str:
        writer = None
        try:
            async with asyncio.timeout(TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    self.path, limit=MAX_ANSWER_BYTES
                )
                writer.write(request)
                await writer.drain()
                answer = await reader.readuntil(b"\n\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise OverlayFailed(
                f"wireguard-go ({self.interface}) does not answer on {self.path}: {_reason(error)}"
            ) from None
        except TimeoutError:
            raise OverlayFailed(
                f"wireguard-go ({self.interface}) did not answer on {self.path} within {TIMEOUT:g}s"
            ) from None
        finally:
            if writer is not None:
                writer.close()
        return answer.decode("utf-8", "replace")


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    return type(error).__name__


_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def listener_pid(path: Path) -> int | None:
    """The process listening on the unix socket ``path`` (SO_PEERCRED), or ``None`` when
    nothing does (a file left by a process that was killed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as error:
            raise OverlayFailed(f"cannot reach {path}: {_reason(error)}") from None
        pid, _uid, _gid = _PEERCRED.unpack(
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    return pid if pid > 0 else None
