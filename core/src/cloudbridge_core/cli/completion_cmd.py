"""``cloudbridge completion SHELL``: print a shell completion script."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash: eval "$(cloudbridge completion bash)"   (in ~/.bashrc)
    zsh:  eval "$(cloudbridge completion zsh)"    (in ~/.zshrc)
    fish: cloudbridge completion fish > ~/.config/fish/completions/cloudbridge.fish
    """
    completion_class = get_completion_class(shell)
    if completion_class is None:  # click knows these three; guard against a future change
        raise click.UsageError(f"unsupported shell {shell!r}")
    root = ctx.find_root().command
    click.echo(completion_class(root, {}, "cloudbridge", "_CLOUDBRIDGE_COMPLETE").source())
