"""The wireguard-go backend: a child process per interface, configured over its UAPI
socket, and the removal of one left by an earlier run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from cloudbridge_core.api import NO_NET_ADMIN, OverlayFailed, OverlayPeer, get_logger

from cloudbridge_wireguard.uapi import (
    DeviceStatus,
    Uapi,
    UapiError,
    hex_key,
    listener_pid,
    peer_lines,
    removal_lines,
    socket_path,
)

log = get_logger("overlay.wireguard")

PROGRAM = "wireguard-go"
NOT_INSTALLED = (
    "wireguard-go is not installed, and the kernel has no WireGuard: install the Debian "
    "package wireguard-go (apt install wireguard-go)"
)
#: wireguard-go logs these (at LOG_LEVEL=verbose) once its UAPI socket listens, and once
#: its device is up (it brings it up by itself, with a socket on any port, just after
#: starting). Only an up device binds its socket when told a port, and says whether that
#: failed; told one while still down it would fail later, silently, and stay down
LISTENING = "UAPI listener started"
DEVICE_UP = "requested Up, now Up"
#: how long wireguard-go may take to create its device and socket
START_TIMEOUT = 10.0
#: how long a wireguard-go asked to stop (SIGTERM) may take before it is killed
STOP_TIMEOUT = 5.0
EADDRINUSE = 98


class WireGuardGo:
    """One running ``wireguard-go -f <interface>``, kept as a child process."""

    backend = "wireguard-go"

    def __init__(
        self, interface: str, process: asyncio.subprocess.Process, output: asyncio.Task[None]
    ) -> None:
        self.interface = interface
        self.process = process
        self._output = output
        self._uapi = Uapi(interface)

    @classmethod
    async def start(cls, interface: str) -> WireGuardGo:
        """Start wireguard-go for ``interface``; wait until its UAPI socket listens and its
        device is up.

        Raises :class:`OverlayFailed` when it is not installed or does not come up."""
        program = shutil.which(PROGRAM)
        if program is None:
            raise OverlayFailed(NOT_INSTALLED)
        argv = [program, "-f", interface]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # it exits with this process, even after a kill -9 (the next up would remove
            # it anyway, but a live one would keep the pool's route pointing at a dead tunnel)
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WG_")}
        env["LOG_LEVEL"] = "verbose"  # it says when its socket listens
        log.debug("overlay change", change=f"{PROGRAM} -f {interface}")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's ^C goes to us; we stop it in order
            )
        except OSError as error:
            raise OverlayFailed(
                f"cannot start {program}: {os.strerror(error.errno or 5)}"
            ) from None
        assert process.stdout is not None
        seen: deque[str] = deque(maxlen=20)
        waiting = [LISTENING, DEVICE_UP]
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while waiting and (line := await process.stdout.readline()):
                    text = line.decode("utf-8", "replace").rstrip()
                    seen.append(text)
                    log.debug("wireguard-go", interface=interface, line=text)
                    waiting = [said for said in waiting if said not in text]
        except TimeoutError:
            pass
        except BaseException:  # cancelled: it must not outlive the attempt
            await _stop(process)
            raise
        if waiting:
            await _stop(process)
            raise _start_failure(interface, seen)
        output = asyncio.create_task(_drain(interface, process.stdout))
        return cls(interface, process, output)

    def _check_alive(self) -> None:
        if self.process.returncode is not None:
            raise OverlayFailed(
                f"wireguard-go ({self.interface}) exited with code {self.process.returncode}; "
                "its output is in the debug log"
            )

    async def configure(self, private_key: str, listen_port: int) -> None:
        self._check_alive()
        lines = [
            ("private_key", hex_key(private_key, "the overlay's private key")),
            ("listen_port", str(listen_port)),
        ]
        try:
            await self._uapi.set(lines)
        except UapiError as error:
            if error.errno == EADDRINUSE:
                raise OverlayFailed(
                    f"UDP port {listen_port} is in use: set overlay.wireguard.listen_port "
                    "to a free port, or 0 for any"
                ) from None
            raise OverlayFailed(
                f"wireguard-go ({self.interface}) refused its key and port: {error}"
            ) from None

    async def status(self) -> DeviceStatus:
        self._check_alive()
        return await self._uapi.get()

    async def apply(
        self, peers: Sequence[OverlayPeer], existing: frozenset[str], remove: Sequence[str]
    ) -> None:
        """One UAPI transaction: add or update ``peers``, remove ``remove``."""
        lines: list[tuple[str, str]] = []
        for peer in peers:
            lines += peer_lines(peer, existing=peer.public_key in existing)
        for public_key in remove:
            lines += removal_lines(public_key)
        if not lines:
            return
        self._check_alive()
        try:
            await self._uapi.set(lines)
        except UapiError as error:
            raise OverlayFailed(
                f"wireguard-go ({self.interface}) refused the peer update: {error}"
            ) from None

    async def close(self) -> None:
        """Stop wireguard-go (it removes its interface and socket); idempotent."""
        await _stop(self.process)
        with contextlib.suppress(asyncio.CancelledError):
            await self._output
        socket_path(self.interface).unlink(missing_ok=True)  # left only by a SIGKILL


async def _drain(interface: str, stream: asyncio.StreamReader) -> None:
    """wireguard-go's output, to the debug log (it never prints keys, only their start)."""
    while line := await stream.readline():
        log.debug(
            "wireguard-go", interface=interface, line=line.decode("utf-8", "replace").rstrip()
        )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _start_failure(interface: str, seen: Sequence[str]) -> OverlayFailed:
    said = " / ".join(line for line in seen if line and not line.startswith(("│", "┌", "└")))
    lowered = said.lower()
    if "operation not permitted" in lowered or "permission denied" in lowered:
        return OverlayFailed(NO_NET_ADMIN)
    if "/dev/net/tun" in lowered and "no such file" in lowered:
        return OverlayFailed(
            "wireguard-go needs the TUN device /dev/net/tun, which is missing "
            "(in a container: give it the device, e.g. --device /dev/net/tun)"
        )
    return OverlayFailed(
        f"wireguard-go could not bring up {interface}: {said[-500:] or 'it exited silently'}"
    )


async def remove_leftover(interface: str) -> bool:
    """Stop a wireguard-go still serving ``interface`` (an earlier run killed before its
    ``down``), or remove the socket file a killed one left; whether there was one."""
    path = socket_path(interface)
    if not path.exists():
        return False
    pid = listener_pid(path)
    if pid is None:
        log.debug("overlay change", change=f"rm {path}")
        path.unlink(missing_ok=True)
        return True
    program = _program(pid)
    if program != PROGRAM:
        raise OverlayFailed(
            f"{path} belongs to {program or 'another process'} (pid {pid}), not to a "
            "wireguard-go: stop it or set another overlay.interface"
        )
    log.info("overlay leftover", interface=interface, pid=pid, action="stopping wireguard-go")
    await _terminate(pid)
    path.unlink(missing_ok=True)
    return True


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def _terminate(pid: int) -> None:
    """SIGTERM ``pid`` and wait for it to exit (its pidfd turns readable), SIGKILL after
    :data:`STOP_TIMEOUT`."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError as error:
        raise OverlayFailed(
            f"cannot watch wireguard-go (pid {pid}): {os.strerror(error.errno or 5)}"
        ) from None
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            except OSError as error:
                raise OverlayFailed(
                    f"cannot stop wireguard-go (pid {pid}): {os.strerror(error.errno or 5)}"
                ) from None
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await asyncio.shield(exited)
                return
            except TimeoutError:
                continue
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
