"""``cloudbridge join URL``: redeem an invite, keep the token, write the config, join.

Nothing is written unless the relay accepted the invite, and the token's storage is
checked before the one-time code is spent: a used, expired or forged invite, or a machine
without a keyring (and no --insecure-storage), leaves the disk as it was.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import platformdirs
import yaml

from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.p2p_cmd import join_mesh
from cloudbridge_core.cli.runtime import runtime_of
from cloudbridge_core.client.tokens import StoredTokens, storage_settings
from cloudbridge_core.errors import ConnectionTimeout, UsageError, error_for_code
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Endpoint
from cloudbridge_core.relay.invites import MAX_INVITE_URL, InviteLink
from cloudbridge_core.tlsutil import client_context
from cloudbridge_core.transports.tls import TlsTransport
from cloudbridge_core.wire import MessageStream

REDEEM_TIMEOUT = 15.0


def default_config_dir() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return platformdirs.user_config_path("cloudbridge")


@click.command()
@click.argument("url")
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where config.yaml, ca.pem (and with --insecure-storage the token) go.",
    show_default="the user config directory",
)
@click.option("--no-start", is_flag=True, help="Write the config, do not join the mesh now.")
@click.option(
    "--insecure-storage",
    is_flag=True,
    help="Keep the token in a 0600 file when no OS keyring is available (headless servers).",
)
@click.pass_context
def join(
    ctx: click.Context, url: str, config_dir: Path | None, no_start: bool, insecure_storage: bool
) -> None:
    """Join a relay with an invite URL (`-` reads it from stdin)."""
    # read one byte past the limit from stdin, so that parse() can refuse a longer line
    link = InviteLink.parse(sys.stdin.readline(MAX_INVITE_URL + 1) if url == "-" else url)
    # absolute, so the config written there works from any directory (a service runs from /)
    directory = Path(os.path.abspath(config_dir or default_config_dir()))
    config_file = directory / "config.yaml"
    if config_file.exists():
        raise UsageError(
            f"{config_file} exists already", hint="remove it, or give another --config-dir"
        )
    auth = storage_settings(directory, insecure=insecure_storage)  # before the code is spent
    redeemed = asyncio.run(_redeem(link))
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(link.ca)
    StoredTokens.written(auth, link.host).save(redeemed.token)
    document: dict[str, Any] = {
        "relay": {"host": link.host, "tls": {"ca_file": str(ca_file)}},
        "transport": {name: {"port": port} for name, port in redeemed.ports.items()},
        "auth": {"type": "jwt", **auth},
    }
    config_file.write_text(
        "# Written by 'cloudbridge join'. The token is kept in "
        f"{'the 0600 file auth.token_file' if insecure_storage else 'the OS keyring'}.\n"
        + yaml.safe_dump(document, sort_keys=False)
    )
    message(f"joined tenant {redeemed.tenant_id} at {link.host}; config: {config_file}")
    if no_start:
        return
    runtime = runtime_of(ctx)
    runtime.use_config(str(config_file))
    join_mesh(runtime, None, "p2p-first")


async def _redeem(link: InviteLink) -> messages.Redeemed:
    """Spend the invite's code with the relay its URL names, trusting only its CA."""
    endpoint = Endpoint(link.host, link.port, client_context(link.ca), REDEEM_TIMEOUT)
    try:
        async with asyncio.timeout(REDEEM_TIMEOUT):
            session = await TlsTransport().connect(endpoint)
            try:
                control = MessageStream(
                    await session.open_stream(), messages.MAX_RELAY_MESSAGE_SIZE
                )
                await control.send(messages.Redeem(link.code))
                reply = await control.expect(messages.Redeemed, messages.ErrorMessage)
            finally:
                await session.aclose()
    except TimeoutError:
        raise ConnectionTimeout(
            f"the relay at {link.host}:{link.port} did not answer in {REDEEM_TIMEOUT:g}s"
        ) from None
    if isinstance(reply, messages.ErrorMessage):
        raise error_for_code(reply.code, reply.message)
    assert isinstance(reply, messages.Redeemed)  # expect() allowed only these two kinds
    return reply
