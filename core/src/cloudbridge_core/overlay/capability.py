"""The one privilege an overlay needs: CAP_NET_ADMIN (interfaces, routes, nftables).
Checked before anything is touched, so that its absence is named as such rather than as
whichever call failed first."""

from __future__ import annotations

import os
from pathlib import Path

from cloudbridge_core.errors import OverlayFailed

CAP_NET_ADMIN = 12
NO_NET_ADMIN = (
    "the overlay needs CAP_NET_ADMIN, which this process lacks: run cloudbridge as root or "
    "grant it the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN, which `cloudbridge "
    "service install` adds when overlay.enabled is on); the mesh keeps running without the "
    "overlay"
)


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0  # no /proc: assume root has it, and let the kernel say otherwise


def require_net_admin() -> None:
    if not has_net_admin():
        raise OverlayFailed(NO_NET_ADMIN)
