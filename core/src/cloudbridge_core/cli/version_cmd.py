"""``cloudbridge version``."""

from __future__ import annotations

import platform

import click

from cloudbridge_core import __version__
from cloudbridge_core.cli.output import emit_json, json_option
from cloudbridge_core.cli.runtime import runtime_of
from cloudbridge_core.plugins import CORE_DISTRIBUTION


@click.command()
@json_option
@click.pass_context
def version(ctx: click.Context, as_json: bool) -> None:
    """Show the versions of the core, the plugins, Python and the platform."""
    plugins = [r for r in runtime_of(ctx).plugins.records if not r.builtin]
    if as_json:
        emit_json(
            {
                "core": {"distribution": CORE_DISTRIBUTION, "version": __version__},
                "plugins": [
                    {
                        "name": r.name,
                        "distribution": r.distribution,
                        "version": r.version,
                        "status": r.status,
                    }
                    for r in plugins
                ],
                "python": {
                    "version": platform.python_version(),
                    "implementation": platform.python_implementation(),
                },
                "platform": {
                    "system": platform.system(),
                    "release": platform.release(),
                    "machine": platform.machine(),
                },
            }
        )
        return
    click.echo(f"{CORE_DISTRIBUTION} {__version__}")
    for r in plugins:
        click.echo(f"{r.distribution} {r.version} ({r.status})")
    click.echo(f"{platform.python_implementation()} {platform.python_version()}")
    click.echo(f"{platform.system()} {platform.release()} {platform.machine()}")
