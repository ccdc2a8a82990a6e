"""``cloudbridge service``: install, remove, start, stop, restart and show the client as a
system service (systemd on Linux, launchd on macOS, the service control manager on Windows
with ``cloudbridge-core[windows]``). ``install`` checks the config first, and puts a token
given by a flag or the environment into the unit's credential (or refuses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.runtime import Runtime, config_option, runtime_of
from cloudbridge_core.config import Config
from cloudbridge_core.errors import CloudBridgeError, UsageError
from cloudbridge_core.secretfile import write_secret
from cloudbridge_core.service import windows
from cloudbridge_core.service.launchd import LABEL, render_plist
from cloudbridge_core.service.systemd import (
    ServiceTokens,
    environment_file,
    given_token,
    render_unit,
    service_tokens,
    unit_name,
)

SYSTEMD_DIR = Path("/etc/systemd/system")
LAUNCHD_DIR = Path("/Library/LaunchDaemons")


def _config_path(runtime: Runtime) -> Path:
    path = runtime.config_path
    if path is None:
        raise UsageError("a service needs a config file: give --config")
    return path


def _executable() -> Path:
    return Path(sys.executable).parent / "cloudbridge"


@click.group()
def service() -> None:
    """Run the client as a system service (systemd, launchd, Windows)."""


@service.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print what would be written; change nothing.")
@click.pass_context
def install(ctx: click.Context, dry_run: bool) -> None:
    """Write the service definition for this config (after checking the config)."""
    runtime = runtime_of(ctx)
    config = runtime.config()  # an invalid config exits 3 before anything is written
    path = _config_path(runtime)
    tokens = ServiceTokens()
    given = given_token(config, os.environ)
    if given is not None and not sys.platform.startswith("linux"):
        raise UsageError(
            f"the token given by {given[1]} cannot be handed to this service",
            hint="keep it in the config's token store first ('cloudbridge login' or 'join')",
        )
    if sys.platform == "darwin":
        target = LAUNCHD_DIR / f"{LABEL}.plist"
        content = render_plist(config, path, _executable(), Path("/var/log/cloudbridge"))
    elif sys.platform.startswith("linux"):
        target = SYSTEMD_DIR / unit_name(config)
        tokens = service_tokens(
            config, renewable=_renews_tokens(runtime, config), token_file=runtime.token_file
        )
        content = render_unit(config, path, _executable(), tokens).encode()
    elif sys.platform == "win32":
        service = windows.definition(config, path)
        if dry_run:
            click.echo(json.dumps(service, indent=2))
            message(f"would register the Windows service {service['name']}")
            return
        windows.install(service)
        message(f"registered the Windows service {service['name']}")
        return
    else:
        raise UsageError("service install supports systemd, launchd and Windows services")
    if dry_run:
        click.echo(content.decode(), nl=False)
        what = "the token given by " + given[1] if given is not None else "the stored token"
        for copy in tokens.copies:
            message(f"would write {copy} (0600: a copy of {what})")
        message(f"would write {target}")
        return
    try:
        for copy, secret in tokens.copies.items():
            write_secret(copy, secret.encode())
        target.write_bytes(content)
    except OSError as exc:
        raise CloudBridgeError(
            f"cannot write {exc.filename}: {exc.strerror or exc}",
            hint="a system service is installed as root (sudo)",
        ) from None
    message(f"wrote {target}")
    if sys.platform.startswith("linux"):
        message(f"variables the config refers to can go in {environment_file(config)} (0600)")
        _systemctl("daemon-reload")
        _systemctl("enable", unit_name(config))


@service.command()
@config_option
@click.pass_context
def uninstall(ctx: click.Context) -> None:
    """Stop and remove the service definition."""
    config = runtime_of(ctx).config()
    if sys.platform == "win32":
        windows.uninstall()
        message(f"removed the Windows service {windows.SERVICE_NAME}")
        return
    target = SYSTEMD_DIR / unit_name(config)
    if not target.exists():
        raise UsageError(f"{target} is not installed")
    _systemctl("disable", "--now", unit_name(config))
    target.unlink()
    _systemctl("daemon-reload")
    message(f"removed {target}")


def _renews_tokens(runtime: Runtime, config: Config) -> bool:
    """Whether the auth provider renews tokens itself (OIDC), so the service must be able
    to write them."""
    spec = runtime.plugins.auth_providers().get(config.settings.auth.type)
    return spec is not None and spec.token_source is not None


#: what each verb does, as its --help says
CONTROL_HELP = {
    "start": "Start the client's service (systemctl, sc.exe).",
    "stop": "Stop the client's service (systemctl, sc.exe).",
    "restart": "Restart the client's service (systemctl, sc.exe).",
    "status": "Show the state of the client's service (systemctl, sc.exe).",
}


def _control(verb: str) -> click.Command:
    @click.command(verb, help=CONTROL_HELP[verb])
    @config_option
    @click.pass_context
    def command(ctx: click.Context) -> None:
        config = runtime_of(ctx).config()
        if sys.platform == "win32":
            sc_verb = {"status": "query", "restart": "stop"}.get(verb, verb)
            click.echo(_manage("sc.exe", sc_verb, windows.SERVICE_NAME), nl=False)
            if verb == "restart":
                click.echo(_manage("sc.exe", "start", windows.SERVICE_NAME), nl=False)
        elif verb == "status":
            click.echo(service_status(unit_name(config)), nl=False)
        else:
            unit = unit_name(config)
            done = _run("systemctl", verb, unit)
            if done.returncode != 0:
                raise _systemctl_error(done, unit)
            click.echo(done.stdout, nl=False)
            message(f"{verb} {unit}: done")

    return command


#: systemctl status: the unit is unknown (LSB "program or service status is unknown")
NO_SUCH_UNIT = 4


def service_status(unit: str) -> str:
    """``systemctl status UNIT``'s text; raises a clear error when there is no systemd or
    no such unit, rather than printing nothing."""
    done = _run("systemctl", "status", "--no-pager", unit)
    if (
        done.returncode == NO_SUCH_UNIT
        or _systemd_missing(done.stderr)
        or "could not be found" in done.stderr
    ):
        raise _systemctl_error(done, unit, unit_unknown=done.returncode == NO_SUCH_UNIT)
    return done.stdout


def _systemctl_error(
    done: subprocess.CompletedProcess[str], unit: str, *, unit_unknown: bool = False
) -> CloudBridgeError:
    """What a failed systemctl call on ``unit`` means for the user: no systemd here, no
    such unit (``unit_unknown``, or systemctl's words for it), or systemctl's first line."""
    reason = done.stderr.strip().splitlines()[0] if done.stderr.strip() else "no reason given"
    if _systemd_missing(done.stderr):
        return CloudBridgeError(
            f"systemd is not running on this machine: {reason}",
            hint="run the client in the foreground ('cloudbridge up' or 'cloudbridge p2p')",
        )
    # status says "Unit U could not be found.", start and restart "Unit U not found.",
    # stop "Unit U not loaded."
    if unit_unknown or any(
        words in done.stderr for words in ("could not be found", "not found.", "not loaded.")
    ):
        return CloudBridgeError(
            f"the service {unit} is not installed",
            hint="install it with 'sudo cloudbridge service install --config ...'",
        )
    denied = "Access denied" in done.stderr or "authentication required" in done.stderr
    return CloudBridgeError(
        f"systemctl {' '.join(done.args[1:])} failed: {reason}",
        hint="a system service is managed as root: run it again with sudo" if denied else None,
    )


def _systemd_missing(stderr: str) -> bool:
    return any(
        sign in stderr
        for sign in ("not been booted with systemd", "Failed to connect to bus", "Host is down")
    )


def _systemctl(*args: str) -> str:
    return _manage("systemctl", *args)


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [tool, *args], capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError:
        what = "systemd is not available" if tool == "systemctl" else f"{tool} is not available"
        raise CloudBridgeError(
            f"{what} on this machine ({tool} not found)",
            hint="run the client in the foreground ('cloudbridge up' or 'cloudbridge p2p')",
        ) from None


def _manage(tool: str, *args: str) -> str:
    done = _run(tool, *args)
    if done.returncode != 0 and args[0] not in ("status", "query"):
        reason = done.stderr.strip().splitlines()[0] if done.stderr.strip() else "no reason given"
        raise CloudBridgeError(f"{tool} {' '.join(args)} failed: {reason}")
    return done.stdout


for _verb in ("start", "stop", "restart", "status"):
    service.add_command(_control(_verb))
