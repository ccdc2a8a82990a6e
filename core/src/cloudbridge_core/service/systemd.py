"""A hardened systemd unit for the client (``cloudbridge service install`` on Linux).

The unit runs ``cloudbridge p2p --config C`` with ``Type=notify`` (the client says READY
once its tunnels listen), restarts on failure after ``service.restart_delay``, and keeps
every privilege it does not need out: no new privileges, a read-only system, private
/tmp, and no capabilities at all unless the WireGuard overlay is enabled (CAP_NET_ADMIN).
The token is never written in the unit: systemd hands the service a credential
(``LoadCredential=token:FILE``, read from a 0600 file; the client reads it from
``$CREDENTIALS_DIRECTORY``), and ``/etc/cloudbridge/UNIT.env`` (0600, optional) can set
variables the config refers to, like ``CLOUDBRIDGE_TOKEN``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from cloudbridge_core.config import Config
from cloudbridge_core.durations import parse_duration

CONFIG_DIR = Path("/etc/cloudbridge")
CREDENTIALS_DIR = CONFIG_DIR / "credentials"

HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "PrivateDevices={private_devices}",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RemoveIPC=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "UMask=0077",
)


def unit_name(config: Config) -> str:
    name: str = config.get("service.name")
    return name if name.endswith(".service") else f"{name}.service"


def environment_file(config: Config) -> Path:
    return CONFIG_DIR / f"{unit_name(config).removesuffix('.service')}.env"


def render_unit(
    config: Config, config_path: Path, executable: Path, credential: Path | None
) -> str:
    """The unit; ``credential``: the 0600 file systemd hands the service as its token."""
    overlay = bool((config.data["p2p"].get("wireguard") or {}).get("enabled"))
    capabilities = "CAP_NET_ADMIN" if overlay else ""
    token = ["--token-file", "%d/token"] if credential is not None else []
    command = shlex.join([str(executable), *token, "p2p", "--config", str(config_path.resolve())])
    service = [
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command}",
        *([f"LoadCredential=token:{credential}"] if credential is not None else []),
        f"EnvironmentFile=-{environment_file(config)}",
        f"Restart={'on-failure' if config.get('service.auto_restart') else 'no'}",
        f"RestartSec={parse_duration(config.get('service.restart_delay')):g}s",
        "StateDirectory=cloudbridge",
        "RuntimeDirectory=cloudbridge",
        "Environment=XDG_STATE_HOME=%S XDG_RUNTIME_DIR=%t",
        f"CapabilityBoundingSet={capabilities}",
        f"AmbientCapabilities={capabilities}",
        *(line.format(private_devices="no" if overlay else "yes") for line in HARDENING),
    ]
    for key in ("user", "group"):
        if config.get(f"service.{key}"):
            service.append(f"{key.capitalize()}={config.get(f'service.{key}')}")
    return "\n".join(
        [
            "[Unit]",
            f"Description={config.get('service.description')}",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            *service,
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )
