"""``cloudbridge login``: get a token from the OpenID Provider and keep it."""

from __future__ import annotations

import asyncio
import webbrowser
from typing import TYPE_CHECKING

import click
from cloudbridge_core.api import (
    ConfigError,
    ConfigIssue,
    StoredTokens,
    UsageError,
    config_option,
    message,
    runtime_of,
    token_expires_in,
)

if TYPE_CHECKING:
    from cloudbridge_oidc.client import DeviceCode


@click.command()
@config_option
@click.option("--no-browser", is_flag=True, help="Only print the address to open.")
@click.pass_context
def login(ctx: click.Context, no_browser: bool) -> None:
    """Log in to the OpenID Provider (auth.oidc) and keep the token for this relay.

    People get a code to approve in a browser, here or on another device (the device
    flow); with auth.oidc.client_secret set, a machine uses client credentials.
    """
    from cloudbridge_oidc.client import OidcClient, keep  # authlib: on use only

    config = runtime_of(ctx).config()
    if config.get("auth.type") != "oidc":
        raise UsageError(
            f"auth.type is {config.get('auth.type')!r}: login is for auth.type oidc",
            hint="set auth.type: oidc and auth.oidc.issuer (cloudbridge init asks for both)",
        )
    try:
        client = OidcClient(config.section("auth.oidc"))
    except ValueError as exc:
        raise ConfigError([ConfigIssue("auth.oidc", str(exc))]) from None
    store = StoredTokens.of(config.settings.auth, config.settings.relay.host)
    store.ensure_keepable()  # before the provider issues a token we could not keep

    def show(code: DeviceCode) -> None:
        address = code.verification_uri_complete or code.verification_uri
        message(f"To log in, open {address}")
        message(
            f"and check that it shows the code {code.user_code}"
            if code.verification_uri_complete
            else f"and enter the code {code.user_code}"
        )
        message(f"(the code expires in {round(code.expires_in)}s; waiting for approval...)")
        if not no_browser:
            webbrowser.open(address)

    if client.machine:
        token = asyncio.run(client.client_credentials())
    else:
        token = asyncio.run(client.device_flow(show))
    keep(store, token)
    left = token_expires_in(str(token["access_token"]))
    valid = f"; valid for {round(left)}s" if left is not None else ""
    refresh = " (renewed with a refresh token)" if token.get("refresh_token") else ""
    message(f"logged in; token kept in the {store.where()}{valid}{refresh}")
