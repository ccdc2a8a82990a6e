"""The ``cloudbridge`` command: global options, plugin commands, exit codes.

Exit codes (``docs/errors.md``): 0 ok, 1 failure, 2 usage, 3 config invalid, 4 auth,
5 relay unavailable, 6 unhealthy, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Sequence

import click

from cloudbridge_core import __version__
from cloudbridge_core.cli.output import report_error
from cloudbridge_core.cli.runtime import log, runtime_of
from cloudbridge_core.errors import CloudBridgeError, ExitCode, ProviderNotInstalled
from cloudbridge_core.log import LEVELS

#: commands that must work even when an explicitly selected plugin is broken
DIAGNOSTIC_COMMANDS = {"plugins", "version", "completion"}


#: the core's commands, imported only when used: a command pays only for its own imports
CORE_COMMANDS = {
    "plugins": "plugins_cmd:plugins",
    "config": "config_cmd:config",
    "version": "version_cmd:version",
    "completion": "completion_cmd:completion",
    "relay": "relay_cmd:relay",
    "tunnel": "tunnel_cmd:tunnel",
    "status": "status_cmd:status",
    "health": "health_cmd:health",
    "p2p": "p2p_cmd:p2p",
    "ping": "p2p_cmd:ping",
    "ip": "ip_cmd:ip",
    "init": "init_cmd:init",
    "join": "join_cmd:join",
    "service": "service_cmd:service",
    "up": "up_cmd:up",
    "down": "up_cmd:down",
    "logout": "logout_cmd:logout",
    "demo": "demo_cmd:demo",
}


def core_command(name: str) -> click.Command:
    module, attribute = CORE_COMMANDS[name].split(":")
    command: click.Command = getattr(
        importlib.import_module(f"cloudbridge_core.cli.{module}"), attribute
    )
    return command


class CloudBridgeGroup(click.Group):
    """A group whose commands are the core's plus those active plugins add."""

    def _plugin_commands(self, ctx: click.Context) -> click.Group:
        runtime = runtime_of(ctx)
        extra = click.Group()
        runtime.plugins.add_commands(
            extra,
            on_error=lambda name, exc: log.warning(
                "plugin_commands_failed", plugin=name, error=f"{type(exc).__name__}: {exc}"
            ),
        )
        return extra

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(CORE_COMMANDS)
        # --help must work even with a broken config or plugin selection
        with contextlib.suppress(CloudBridgeError):
            names |= set(self._plugin_commands(ctx).commands)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in CORE_COMMANDS:
            return core_command(cmd_name)
        if ctx.resilient_parsing:
            return None
        return self._plugin_commands(ctx).commands.get(cmd_name)


@click.group(cls=CloudBridgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    help="Config file (default: $CLOUDBRIDGE_CONFIG, user config dir, /etc/cloudbridge).",
)
@click.option("--log-level", type=click.Choice(list(LEVELS)), help="Override logging.level.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Override logging.format.")
@click.option("-v", "--verbose", count=True, help="More logging (debug).")
@click.option("-q", "--quiet", count=True, help="Less logging (errors only).")
@click.option(
    "--plugin",
    multiple=True,
    metavar="NAME",
    help="Load only these plugins (repeatable; beats $CLOUDBRIDGE_PLUGINS, plugins.enabled).",
)
@click.option("--no-plugins", is_flag=True, help="Load no installed plugins (built-ins stay).")
@click.option("--no-color", is_flag=True, help="No colour in messages (NO_COLOR is honoured too).")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Read the bearer token from this file (beats auth.token and the keyring).",
)
@click.option("--token-stdin", is_flag=True, help="Read the bearer token from stdin.")
@click.option(
    "--token",
    metavar="TOKEN",
    help="The bearer token itself; other users can see it in ps and it stays in shell"
    " history, so prefer --token-file, --token-stdin or CLOUDBRIDGE_TOKEN.",
)
@click.version_option(__version__, "-V", "--version", prog_name="cloudbridge")
@click.pass_context
def cli(ctx: click.Context, /, **_options: object) -> None:
    """CloudBridge: P2P mesh networking and TCP tunnels through a relay you can host.

    \b
    Exit codes: 0 ok, 1 failure, 2 usage, 3 config invalid, 4 auth required or invalid,
    5 relay unavailable, 6 unhealthy, 130 interrupted.
    """
    runtime = runtime_of(ctx)
    runtime.configure_logging()
    if ctx.invoked_subcommand not in DIAGNOSTIC_COMMANDS:
        broken = runtime.plugins.failed_explicit()
        if broken:
            first = broken[0]
            raise ProviderNotInstalled(
                f"plugin {first.name!r} was selected but failed to load: {first.error}",
                hint="run 'cloudbridge plugins list' for details",
            )


def run(command: click.Command, args: Sequence[str]) -> int:
    """Invoke ``command`` and turn every outcome into a documented exit code."""
    as_json = "--json" in args
    try:
        result = command.main(list(args), prog_name="cloudbridge", standalone_mode=False)
    except CloudBridgeError as error:
        report_error(error, as_json=as_json)
        return int(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return result if isinstance(result, int) else int(ExitCode.OK)


def main() -> None:
    sys.exit(run(cli, sys.argv[1:]))
