"""What every command shares: global options, the config sources, the loaded plugins."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import click

from cloudbridge_core.client.control import socket_for
from cloudbridge_core.client.tokens import loose_permissions
from cloudbridge_core.config import (
    Config,
    RawConfig,
    merged_schema,
    read_sources,
    search_path,
    validate,
)
from cloudbridge_core.config.schema import Schema, core_schema, node_at, provider_choices
from cloudbridge_core.log import configure_logging, get_logger
from cloudbridge_core.plugins import FAMILY_WORDS, Plugins, PluginSelection, load_plugins
from cloudbridge_core.settings import LoggingSettings

log = get_logger("cli")


@dataclass
class Runtime:
    """Built once per invocation from the root command's options."""

    config_flag: str | None = None
    overrides: dict[str, tuple[Any, str]] = field(default_factory=dict)
    flag_plugins: tuple[str, ...] = ()
    no_plugins: bool = False
    color: bool = True
    #: --debug: tracebacks for failures, debug logging
    debug: bool = False
    #: the flag that gave the token (--token-file, --token-stdin, --token), if one did
    token_flag: str | None = None
    #: the file --token-file named, before or after the subcommand (a service unit loads it)
    token_file: Path | None = None
    #: warnings about how the token was given, said when the config is first read: a
    #: probe that prints nothing (``health --check``) has silenced its output by then
    token_warnings: list[str] = field(default_factory=list)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Runtime:
        overrides: dict[str, tuple[Any, str]] = {}
        verbosity = params.get("verbose", 0) - params.get("quiet", 0)
        if params.get("log_level"):
            overrides["logging.level"] = (params["log_level"], "--log-level")
        elif params.get("debug"):
            overrides["logging.level"] = ("debug", "--debug")
        elif verbosity:
            overrides["logging.level"] = ("debug" if verbosity > 0 else "error", "-v/-q")
        if params.get("log_format"):
            overrides["logging.format"] = (params["log_format"], "--log-format")
        token_warnings: list[str] = []
        token = _token_from(params, token_warnings)
        if token is not None:
            overrides["auth.token"] = token
        return cls(
            config_flag=params.get("config"),
            overrides=overrides,
            flag_plugins=tuple(params.get("plugin") or ()),
            no_plugins=bool(params.get("no_plugins")),
            color=not params.get("no_color") and "NO_COLOR" not in os.environ,
            debug=bool(params.get("debug")),
            token_flag=token[1] if token is not None else None,
            token_file=Path(params["token_file"]) if params.get("token_file") else None,
            token_warnings=token_warnings,
        )

    def _forget(self) -> None:
        for cached in ("config_path", "raw", "plugins", "schema"):
            self.__dict__.pop(cached, None)

    def use_config(self, path: str) -> None:
        """A subcommand's own ``--config`` (``cloudbridge tunnel --config C``) wins."""
        self.config_flag = path
        self._forget()
        self.configure_logging()

    def use_token(self, params: Mapping[str, Any]) -> None:
        """A token flag given after the subcommand (``cloudbridge p2p --token-file F``)."""
        given = ["--" + name.replace("_", "-") for name, value in params.items() if value]
        if given and self.token_flag is not None:
            raise click.UsageError(f"{self.token_flag} and {given[0]} both give the token: use one")
        token = _token_from(params, self.token_warnings)
        if token is None:
            return
        self.token_flag = token[1]
        if params.get("token_file"):
            self.token_file = Path(params["token_file"])
        self.overrides["auth.token"] = token
        self._forget()

    def use_level(self, level: str, flag: str) -> None:
        """``-q`` or ``--debug`` given after the subcommand (``--log-level`` still wins)."""
        if self.overrides.get("logging.level", (None, ""))[1] == "--log-level":
            return
        self.overrides["logging.level"] = (level, flag)
        self._forget()
        self.configure_logging()

    @cached_property
    def config_path(self) -> Path | None:
        """The config file in use; raises ``ConfigError`` if an explicit one is missing."""
        return search_path(self.config_flag, self.environ)

    def read(self, path: Path | None) -> RawConfig:
        """Every source of ``path``, read with the plugins' sections known: an environment
        value for a plugin's key (``CLOUDBRIDGE_TRANSPORT__QUIC__PORT``) gets its type."""
        for warning in self.token_warnings:
            click.echo(f"warning: {warning}", err=True)
        self.token_warnings.clear()
        return read_sources(
            path, environ=self.environ, overrides=self.overrides, schema=self.schema
        )

    @cached_property
    def raw(self) -> RawConfig:
        # the core's schema alone: which plugins to load is read from it
        return read_sources(self.config_path, environ=self.environ, overrides=self.overrides)

    @cached_property
    def plugins(self) -> Plugins:
        section = self.raw.data.get("plugins")
        section = section if isinstance(section, dict) else {}
        selection = PluginSelection.from_sources(
            flag_plugins=self.flag_plugins,
            no_plugins=self.no_plugins,
            env=self.environ,
            config_enabled=_names(section.get("enabled")),
            config_disabled=_names(section.get("disabled")) or (),
        )
        return load_plugins(selection)

    @cached_property
    def schema(self) -> Schema:
        return merged_schema(
            self.plugins.config_sections(), provider_choices(self.plugins, FAMILY_WORDS)
        )

    def config(self) -> Config:
        """The validated effective config; raises ``ConfigError`` listing every problem."""
        return validate(self.read(self.config_path), self.schema)

    def configure_logging(self) -> None:
        """Log as the config says when it can be read, else with defaults and flags."""
        section = self.raw.data.get("logging")
        section = section if isinstance(section, dict) else {}
        level = section.get("level")
        fmt = section.get("format")
        output = section.get("output")
        configure_logging(
            level=_choice("level", level, "info"),
            fmt=_choice("format", fmt, "text"),
            output=output if isinstance(output, str) and output else "stderr",
            max_bytes=_int(section.get("max_bytes"), 100 * 1024 * 1024),
            backup_count=_int(section.get("backup_count"), 5),
            color=self.color and sys.stderr.isatty(),
        )

    def follow_logging(self, initial: LoggingSettings) -> Callable[[Config], list[str]]:
        """A reload subscriber that logs as each new config's ``logging`` section says
        (level, format, output, rotation), returning the keys it applied."""
        current = initial

        def apply(config: Config) -> list[str]:
            nonlocal current
            new = config.settings.logging
            changed = [
                f"logging.{f.name}"
                for f in fields(new)
                if getattr(new, f.name) != getattr(current, f.name)
            ]
            if changed:
                configure_logging(
                    level=new.level,
                    fmt=new.format,
                    output=new.output,
                    max_bytes=new.max_bytes,
                    backup_count=new.backup_count,
                    color=self.color and sys.stderr.isatty(),
                )
                current = new
            return changed

        return apply


def _token_from(params: Mapping[str, Any], warnings: list[str]) -> tuple[str, str] | None:
    """The token given by --token-file, --token-stdin or --token, and which one; what is
    unsafe about how it was given goes to ``warnings``."""
    given = [flag for flag in ("token_file", "token_stdin", "token") if params.get(flag)]
    if len(given) > 1:
        names = " and ".join("--" + flag.replace("_", "-") for flag in given)
        raise click.UsageError(f"{names} both give the token: use one")
    if not given:
        return None
    if given[0] == "token_file":
        path = Path(params["token_file"])
        token = path.read_text().strip()
        warning = loose_permissions(path)
        if warning:
            warnings.append(warning)
    elif given[0] == "token_stdin":
        token = sys.stdin.readline().strip()
    else:
        warnings.append(
            "a token on the command line is visible to other users (ps) and stays in"
            " shell history; use --token-file, --token-stdin or CLOUDBRIDGE_TOKEN"
        )
        token = params["token"].strip()
    flag = "--" + given[0].replace("_", "-")
    if not token:
        raise click.BadParameter("the token is empty", param_hint=flag)
    return token, flag


def runtime_of(ctx: click.Context) -> Runtime:
    """The invocation's runtime, created from the root options on first use."""
    root = ctx.find_root()
    runtime = root.obj
    if not isinstance(runtime, Runtime):
        runtime = root.obj = Runtime.from_params(root.params)
    return runtime


def _use_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        runtime_of(ctx).use_config(value)


config_option = click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    expose_value=False,
    callback=_use_config,
    help="Config file for this command (same as the global --config).",
)

socket_option = click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="derived from --config, in the user's runtime directory",
    help="Where the running client answers `status` and `tunnel list`.",
)


def control_socket_of(runtime: Runtime, given: Path | None) -> Path:
    return given or socket_for(runtime.config_path)


def _names(value: object) -> list[str] | None:
    """Plugin names from the raw config, or None if it holds something else (validation says)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _choice(key: str, value: object, default: str) -> str:
    """``value`` if the schema allows it for ``logging.<key>`` (the one list of level names,
    aliases included, as the schema maps them), else ``default``."""
    node = node_at(core_schema(), ("logging", key)) or {}
    value = node.get("x-cloudbridge-aliases", {}).get(value, value)
    return value if isinstance(value, str) and value in node.get("enum", ()) else default


def _int(value: object, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )
