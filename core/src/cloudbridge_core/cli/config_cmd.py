"""``cloudbridge config``: where the config is, what is in force, and whether a file is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from cloudbridge_core.cli.main import SuggestingGroup
from cloudbridge_core.cli.output import emit_json, json_option, message
from cloudbridge_core.cli.runtime import runtime_of
from cloudbridge_core.config import validate
from cloudbridge_core.config.changes import restart_required_set_by
from cloudbridge_core.errors import ConfigError, ConfigIssue, ExitCode, ProviderNotInstalled
from cloudbridge_core.plugins import Plugins


@click.group(cls=SuggestingGroup)
def config() -> None:
    """Inspect and validate configuration."""


@config.command("path")
@json_option
@click.pass_context
def config_path(ctx: click.Context, as_json: bool) -> None:
    """Print the config file in use (nothing when only defaults apply)."""
    path = runtime_of(ctx).config_path
    if as_json:
        emit_json({"path": str(path) if path else None})
    elif path is None:
        message("no config file: defaults, environment and flags apply")
    else:
        click.echo(str(path))


@config.command("show")
@json_option
@click.option("--origin", is_flag=True, help="Show where each value came from.")
@click.pass_context
def show(ctx: click.Context, as_json: bool, origin: bool) -> None:
    """Print the effective configuration, secrets redacted."""
    effective = runtime_of(ctx).config()
    if as_json:
        document: dict[str, Any] = {
            "source": str(effective.source) if effective.source else None,
            "config": effective.redacted(),
        }
        if origin:
            document["origins"] = {e["key"]: e["origin"] for e in effective.with_origins()}
        emit_json(document)
    elif origin:
        for entry in effective.with_origins():
            value = yaml.safe_dump(entry["value"], default_flow_style=True).strip()
            value = value.removesuffix("\n...").strip()
            click.echo(f"{entry['key']} = {value}  # {entry['origin']}")
    else:
        click.echo(yaml.safe_dump(effective.redacted(), sort_keys=False).rstrip())


@config.command("validate")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.pass_context
def validate_cmd(ctx: click.Context, path: Path | None, as_json: bool) -> None:
    """Check a config file (default: the one in use) and report every error.

    Each error names its dotted path and, where it comes from a file, the line and
    column (``file:line:column: path: message``). Exits 3 when the configuration is invalid.
    """
    runtime = runtime_of(ctx)
    if path is not None and not path.is_file():
        raise ConfigError([ConfigIssue("", "config file not found", str(path))])
    source = path or runtime.config_path
    issues: list[ConfigIssue] = []
    warnings: list[str] = []
    restart: list[str] = []  # keys the file sets that a running process does not reload
    try:
        effective = validate(runtime.read(source), runtime.schema)
    except ConfigError as error:
        issues = error.issues
    else:
        warnings = _provider_warnings(effective.data, runtime.plugins)
        restart = restart_required_set_by(effective, str(source)) if source else []
    if as_json:
        emit_json(
            {
                "valid": not issues,
                "source": str(source) if source else None,
                "errors": [
                    {
                        "path": i.path,
                        "message": i.message,
                        "line": i.line,
                        "column": i.column,
                        "source": i.source,
                    }
                    for i in issues
                ],
                "warnings": warnings,
                "restart_required": restart,
            }
        )
    else:
        for issue in issues:
            click.echo(str(issue))
        for warning in warnings:
            message(f"warning: {warning}")
        if restart:
            keys = ", ".join(restart)
            message(f"need a restart to take effect (a reload does not apply them): {keys}")
        what = str(source) if source else "defaults (no config file)"
        count = len(issues)
        message(
            f"{what}: {'valid' if not issues else f'{count} error' + ('s' if count > 1 else '')}"
        )
    if issues:
        ctx.exit(int(ExitCode.CONFIG_INVALID))


def _provider_warnings(data: Any, plugins: Plugins) -> list[str]:
    """Providers the config names that no active plugin offers, with what to install."""
    wanted = [("transport", data["transport"]["mode"]), ("auth_provider", data["auth"]["type"])]
    warnings = []
    for family, name in wanted:
        if name == "auto":
            continue
        try:
            plugins.require(family, name)
        except ProviderNotInstalled as exc:
            warnings.append(exc.message)
    return warnings
