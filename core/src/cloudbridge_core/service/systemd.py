"""A hardened systemd unit for the client (``cloudbridge service install`` on Linux).

The unit runs ``cloudbridge p2p --config C`` (``tunnel`` when the config turns the mesh
off: see ``service.command``) with ``Type=notify`` (the client says READY once its tunnels
listen), restarts on failure after ``service.restart_delay``, and keeps
every privilege it does not need out: no new privileges, a read-only system, private
/tmp, and no capabilities at all unless the WireGuard overlay is enabled (CAP_NET_ADMIN,
and CAP_NET_BIND_SERVICE for its name responder on port 53).
The token is never written in the unit: systemd hands the service a credential
(``LoadCredential=token:FILE``, read from a 0600 file; the client reads it from
``$CREDENTIALS_DIRECTORY``) — or, when the auth provider renews tokens (OIDC), the tokens
are copied into the service's own state directory, where it can renew them.
``/etc/cloudbridge/UNIT.env`` (0600, optional) can set variables the config refers to,
like ``CLOUDBRIDGE_TOKEN``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cloudbridge_core.client.tokens import StoredTokens
from cloudbridge_core.config import Config
from cloudbridge_core.errors import AuthError
from cloudbridge_core.service.command import client_command

CONFIG_DIR = Path("/etc/cloudbridge")
CREDENTIALS_DIR = CONFIG_DIR / "credentials"
#: the StateDirectory=cloudbridge of a system unit
STATE_DIR = Path("/var/lib/cloudbridge")

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
    name = config.settings.service.name
    return name if name.endswith(".service") else f"{name}.service"


def _stem(config: Config) -> str:
    return unit_name(config).removesuffix(".service")


def environment_file(config: Config) -> Path:
    return CONFIG_DIR / f"{_stem(config)}.env"


@dataclass(frozen=True)
class ServiceTokens:
    """How the service finds its token: ``credential`` (LoadCredential) or ``environment``
    (the token files in its state directory); ``copies`` are written (0600) first."""

    credential: Path | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    copies: Mapping[Path, str] = field(default_factory=dict)


def given_token(config: Config, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """A token the service would not see by itself — given by a flag (``--token``,
    ``--token-stdin``, ``--token-file``) or the environment rather than in the config file —
    and where it came from (``flag --token-file``, ``env CLOUDBRIDGE_TOKEN``)."""
    token = config.settings.auth.token
    if token:
        origin = config.origin(("auth", "token")).source
        if origin.startswith(("flag ", "env ")):
            return token, origin
        return None  # in the config file (or its environment file): the service reads it
    token = environ.get("CLOUDBRIDGE_TOKEN")
    return (token, "env CLOUDBRIDGE_TOKEN") if token else None


def service_tokens(
    config: Config,
    *,
    renewable: bool,
    token_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceTokens:
    """A system service cannot reach a user's keyring nor the installing shell's flags and
    environment: the token is copied for it, into a root-only credential file, or
    (``renewable``: the auth provider renews tokens) with its refresh token into the state
    directory, where the service can replace them. A ``token_file`` given by
    ``--token-file`` is the credential itself."""
    given = given_token(config, os.environ if environ is None else environ)
    if given is not None:
        if token_file is not None and given[1] == "flag --token-file":
            return ServiceTokens(credential=token_file.resolve())
        credential = CREDENTIALS_DIR / f"{_stem(config)}.token"
        return ServiceTokens(credential=credential, copies={credential: given[0]})
    if config.settings.auth.token:  # in the config or its environment file
        return ServiceTokens()
    stored = StoredTokens.of(config.settings.auth, config.settings.relay.host)
    if renewable:
        token_file = STATE_DIR / f"{_stem(config)}.token"
        copies = {
            path: token
            for path, token in (
                (token_file, stored.load()),
                (token_file.with_name(f"{token_file.name}.refresh"), stored.load("refresh")),
            )
            if token is not None
        }
        environment = {
            "CLOUDBRIDGE_AUTH__TOKEN_STORAGE": "file",
            "CLOUDBRIDGE_AUTH__TOKEN_FILE": str(token_file),
        }
        return ServiceTokens(environment=environment, copies=copies)
    if stored.in_file:
        return ServiceTokens(credential=Path(str(config.settings.auth.token_file)).resolve())
    token = stored.load()
    if token is None:
        raise AuthError(
            f"no token is kept for {config.settings.relay.host} in the {stored.where()}",
            hint="run 'cloudbridge join URL' or 'cloudbridge login' first, as the installing user",
        )
    credential = CREDENTIALS_DIR / f"{_stem(config)}.token"
    return ServiceTokens(credential=credential, copies={credential: token})


def render_unit(config: Config, config_path: Path, executable: Path, tokens: ServiceTokens) -> str:
    service_settings = config.settings.service
    overlay = config.settings.overlay
    # the overlay's interface, routes and filter; its name responder on port 53
    needed = ["CAP_NET_ADMIN", *(["CAP_NET_BIND_SERVICE"] if overlay.dns else [])]
    capabilities = " ".join(needed) if overlay.enabled else ""
    credential = tokens.credential
    token = ["--token-file", "%d/token"] if credential is not None else []
    environment = {"XDG_STATE_HOME": "%S", "XDG_RUNTIME_DIR": "%t", **tokens.environment}
    verb = client_command(config)
    command = shlex.join([str(executable), *token, verb, "--config", str(config_path.resolve())])
    service = [
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command}",
        *([f"LoadCredential=token:{credential}"] if credential is not None else []),
        f"EnvironmentFile=-{environment_file(config)}",
        f"Restart={'on-failure' if service_settings.auto_restart else 'no'}",
        f"RestartSec={service_settings.restart_delay:g}s",
        # a usage, config or auth error (exit 2, 3, 4) comes back the same after a restart
        "RestartPreventExitStatus=2 3 4",
        "StateDirectory=cloudbridge",
        # wireguard-go's control sockets live in /run/wireguard, read-only otherwise (made
        # if missing, and kept: other WireGuard tools on the host share it)
        *(
            ["RuntimeDirectory=cloudbridge wireguard", "RuntimeDirectoryPreserve=yes"]
            if overlay.enabled
            else ["RuntimeDirectory=cloudbridge"]
        ),
        "Environment=" + " ".join(f"{k}={v}" for k, v in environment.items()),
        f"CapabilityBoundingSet={capabilities}",
        f"AmbientCapabilities={capabilities}",
        *(line.format(private_devices="no" if overlay.enabled else "yes") for line in HARDENING),
    ]
    if service_settings.user:
        service.append(f"User={service_settings.user}")
    if service_settings.group:
        service.append(f"Group={service_settings.group}")
    return "\n".join(
        [
            "[Unit]",
            f"Description={service_settings.description}",
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
