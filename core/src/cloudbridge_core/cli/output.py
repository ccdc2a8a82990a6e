"""Output conventions: data on stdout, messages on stderr, one JSON document per ``--json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from cloudbridge_core.errors import CloudBridgeError, ConfigError

SCHEMA_VERSION = 1


def _or_global_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """``cloudbridge --json status`` as ``cloudbridge status --json``."""
    return value or bool(ctx.find_root().params.get("as_json"))


json_option = click.option(
    "--json", "as_json", is_flag=True, callback=_or_global_json, help="Print one JSON document."
)


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps({"schema_version": SCHEMA_VERSION, **document}, indent=2, default=str))


def message(text: str) -> None:
    """A message for the person at the terminal (stderr, never mixed with data)."""
    click.echo(text, err=True)


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(
            str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)
        ).rstrip()
        for line in lines
    )


def report_error(error: CloudBridgeError, *, as_json: bool) -> None:
    """``error: <what> (<code>)`` + ``hint:``; with ``--json`` one line of JSON on stderr."""
    if as_json:
        body = error.to_dict()
        if isinstance(error, ConfigError):
            body["issues"] = [str(issue) for issue in error.issues]
        click.echo(json.dumps({"error": body}), err=True)
        return
    if isinstance(error, ConfigError):
        message(f"error: configuration is invalid ({error.code})")
        for issue in error.issues:
            message(f"  {issue}")
    else:
        message(f"error: {error.message} ({error.code})")
    if error.hint:
        message(f"hint: {error.hint}")
