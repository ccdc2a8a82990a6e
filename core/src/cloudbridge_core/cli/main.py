"""The ``cloudbridge`` command: global options, plugin commands, exit codes.

Exit codes (``docs/errors.md``): 0 ok, 1 failure, 2 usage, 3 config invalid, 4 auth,
5 relay unavailable, 6 unhealthy, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import click

from cloudbridge_core import __version__
from cloudbridge_core.cli.output import message, report_error
from cloudbridge_core.cli.runtime import log, runtime_of
from cloudbridge_core.errors import (
    CloudBridgeError,
    ExitCode,
    FileMissing,
    PermissionDenied,
    ProviderNotInstalled,
)
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
    return with_global_options(command)


def _late_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        runtime_of(ctx).use_config(value)


def _late_token(flag: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def use(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value:
            runtime_of(ctx).use_token({flag: value})

    return use


def _late_quiet(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        runtime_of(ctx).use_level("error", "-q")


def _late_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        runtime = runtime_of(ctx)
        runtime.debug = True
        runtime.use_level("debug", "--debug")


def _ignored(_ctx: click.Context, _param: click.Parameter, _value: object) -> None:
    """``--json`` after a command that prints no document: run() still formats errors as JSON."""


#: the root's options that also work after the subcommand: (names, how click takes them)
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("-c", "--config"), {"type": click.Path(dir_okay=False), "callback": _late_config}),
    (
        ("--token-file",),
        {
            "type": click.Path(exists=True, dir_okay=False),
            "callback": _late_token("token_file"),
        },
    ),
    (("--token-stdin",), {"is_flag": True, "callback": _late_token("token_stdin")}),
    (("--token",), {"callback": _late_token("token")}),
    (("--json",), {"is_flag": True, "callback": _ignored}),
    (("--debug",), {"is_flag": True, "callback": _late_debug}),
    (("-q", "--quiet"), {"count": True, "callback": _late_quiet}),
]


def with_global_options(command: click.Command) -> click.Command:
    """``command`` (and its subcommands) also taking the global options after its name, as
    hidden options; a name the command already uses for itself stays its own."""
    if getattr(command, "_cloudbridge_globals", False):
        return command
    taken = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    for names, settings in GLOBAL_OPTIONS:
        free = [name for name in names if name not in taken]
        if any(name.startswith("--") for name in free):
            command.params.append(click.Option(free, expose_value=False, hidden=True, **settings))
    command._cloudbridge_globals = True  # type: ignore[attr-defined]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            with_global_options(sub)
    return command


class SuggestingGroup(click.Group):
    """A group that answers an unknown command with the closest names (``stauts``: ``status``)."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """As click's, and an unknown command gets a did-you-mean (``stauts``: ``status``)."""
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            name = args[0] if args else ""
            if name.startswith("-"):
                raise
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=3, cutoff=0.6)
            if not close:
                raise
            raise click.UsageError(
                f"No such command {name!r}. Did you mean {' or '.join(map(repr, close))}?",
                ctx,
            ) from error


class CloudBridgeGroup(SuggestingGroup):
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
        command = self._plugin_commands(ctx).commands.get(cmd_name)
        return with_global_options(command) if command is not None else None


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
@click.option("--debug", is_flag=True, help="Debug logging, and a traceback for a failure.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Errors as one line of JSON on stderr (and data as JSON where the command prints it).",
)
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

    Global options (--config, --token-file, --token-stdin, --token, --json, --debug, -q)
    also work after the subcommand: cloudbridge p2p --token-file F.
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
    """Invoke ``command`` and turn every outcome into a documented exit code: a failure is
    one or two lines on stderr, with a traceback only under ``--debug``."""
    options = list(args[: args.index("--")] if "--" in args else args)
    as_json = "--json" in options
    debug = "--debug" in options
    try:
        result = command.main(list(args), prog_name="cloudbridge", standalone_mode=False)
    except CloudBridgeError as error:
        if debug:
            traceback.print_exc()
        report_error(error, as_json=as_json)
        return int(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except OSError as error:
        if debug:
            traceback.print_exc()
        classified = classify_os_error(error)
        report_error(classified, as_json=as_json)
        return int(classified.exit_code)
    except Exception as error:  # noqa: BLE001 - the last line: no traceback without --debug
        if debug:
            traceback.print_exc()
        message(f"error: unexpected {type(error).__name__}: {error}")
        message("hint: run again with --debug for the traceback, and report it as a bug")
        return int(ExitCode.FAILURE)
    return result if isinstance(result, int) else int(ExitCode.OK)


def classify_os_error(error: OSError) -> CloudBridgeError:
    """What the operating system refused, as a classified error naming the path at fault."""
    where = f": {error.filename}" if error.filename else ""
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        return FileMissing(
            f"no such file or directory{where}",
            hint="check the path (given on the command line or in the config)",
        )
    if isinstance(error, PermissionError):
        return PermissionDenied(
            f"permission denied{where}",
            hint="run as a user who may use it, or change its owner or mode",
        )
    return CloudBridgeError(
        f"{error.strerror or error}{where}", hint="run again with --debug for the traceback"
    )


def main() -> None:
    sys.exit(run(cli, sys.argv[1:]))
