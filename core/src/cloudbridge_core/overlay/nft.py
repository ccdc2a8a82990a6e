"""One nftables transaction (``nft -f -``) for the overlay's tables: the core's inbound
filter and an overlay plugin's own rules. Every failure leaves as :class:`OverlayFailed`:
a missing capability named as such, nft's own first error line otherwise."""

from __future__ import annotations

import asyncio
import os
import shutil

from cloudbridge_core.errors import OverlayFailed
from cloudbridge_core.log import get_logger
from cloudbridge_core.overlay.capability import NO_NET_ADMIN

log = get_logger("overlay")

#: how long one transaction may take
TIMEOUT = 10.0


def nft_installed() -> bool:
    return shutil.which("nft") is not None


async def run_nft(script: str, what: str) -> None:
    """Apply ``script`` in one transaction; ``what`` names it in errors ("the overlay's
    inbound filter")."""
    program = shutil.which("nft")
    if program is None:
        raise OverlayFailed(f"{what} needs nftables: install the Debian package nftables")
    for line in script.splitlines():
        log.debug("overlay change", change=f"nft {line.strip()}")
    try:
        process = await asyncio.create_subprocess_exec(
            program,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise OverlayFailed(f"cannot run {program}: {os.strerror(error.errno or 5)}") from None
    try:
        async with asyncio.timeout(TIMEOUT):
            _, errors = await process.communicate(script.encode())
    except TimeoutError:
        process.kill()
        await process.wait()
        raise OverlayFailed(f"nft did not set {what} within {TIMEOUT:g}s") from None
    if process.returncode:
        said = errors.decode("utf-8", "replace").strip()
        if "Operation not permitted" in said:
            raise OverlayFailed(NO_NET_ADMIN)
        first = said.splitlines()[0] if said else f"exit code {process.returncode}"
        raise OverlayFailed(f"nftables refused {what}: {first}")
