"""``cloudbridge plugins``: what is installed, active, disabled or broken."""

from __future__ import annotations

import click

from cloudbridge_core.cli.output import emit_json, json_option, table
from cloudbridge_core.cli.runtime import runtime_of


@click.group()
def plugins() -> None:
    """Inspect installed plugins."""


@plugins.command("list")
@json_option
@click.pass_context
def list_plugins(ctx: click.Context, as_json: bool) -> None:
    """List every installed plugin: distribution, version, families, providers, status.

    A plugin that fails to import or load is listed as failed with its error; the
    command still succeeds.
    """
    records = runtime_of(ctx).plugins.records
    if as_json:
        emit_json({"plugins": [record.to_dict() for record in records]})
        return
    rows = [
        (
            record.name,
            record.distribution,
            record.version,
            record.status,
            ", ".join(f"{family}:{','.join(names)}" for family, names in record.providers.items()),
            record.error or "",
        )
        for record in records
    ]
    click.echo(table(rows, ("NAME", "DISTRIBUTION", "VERSION", "STATUS", "PROVIDES", "ERROR")))
