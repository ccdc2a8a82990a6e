"""Hooks of the `oidc` plugin: the auth provider, its config section and `cloudbridge login`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cloudbridge_core.api import (
    AuthProvider,
    AuthProviderSpec,
    BrowserLogin,
    ConfigSection,
    TokenSource,
    hookimpl,
)
from cloudbridge_jwt.hooks import SETTINGS_SCHEMA as JWT_SETTINGS

if TYPE_CHECKING:
    import click

#: the JWT validation settings, as cloudbridge-jwt declares them
SHARED_WITH_JWT = (
    "algorithms",
    "leeway",
    "jwks_cache_ttl",
    "jwks_refetch_cooldown",
    "jwks_fetch_timeout",
    "jwks_refresh_wait",
    "max_token_lifetime",
    "min_rsa_key_bits",
    "tenant_claim",
    "permissions_claim",
    "max_token_bytes",
)

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "issuer": {
            "type": ["string", "null"],
            "pattern": "^https?://",
            "default": None,
            "description": "The OpenID Provider (https; http only on loopback). Its"
            " /.well-known/openid-configuration gives the keys and endpoints.",
        },
        "audience": {
            "type": ["string", "null"],
            "default": None,
            "description": "The aud the relay requires (required on the relay).",
        },
        "jwks_origins": {
            "type": "array",
            "items": {"type": "string", "pattern": "^https?://[^/?#]+$"},
            "default": [],
            "description": "Origins (scheme://host[:port]) other than the issuer's that the"
            " discovery document's jwks_uri may point to; by default only the issuer's own.",
        },
        "client_id": {
            "type": "string",
            "minLength": 1,
            "default": "cloudbridge-cli",
            "description": "The client registered with the provider for cloudbridge login.",
        },
        "console_client_id": {
            "type": ["string", "null"],
            "minLength": 1,
            "default": None,
            "description": "On the relay: the client registered with the provider for the"
            " relay's web console (authorization code with PKCE, no secret; its redirect URI"
            " is the console's address + /console/login/oidc/callback). null: the console"
            " takes pasted tokens only.",
        },
        "client_secret": {
            "type": ["string", "null"],
            "default": None,
            "writeOnly": True,
            "description": "Only for machines (client credentials); people log in with the"
            ' device flow, which needs no secret. Usually "${CLOUDBRIDGE_OIDC_SECRET}".',
        },
        "scopes": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "default": ["openid", "offline_access"],
            "description": "Scopes asked for at login (offline_access: a refresh token).",
        },
        # the JWT checks are cloudbridge-jwt's, configured the same way
        **{key: JWT_SETTINGS["properties"][key] for key in SHARED_WITH_JWT},
    },
}


def _validator(settings: Mapping[str, Any]) -> AuthProvider:
    from cloudbridge_oidc.validator import OidcValidator

    return OidcValidator(settings)


def _browser_login(settings: Mapping[str, Any]) -> BrowserLogin | None:
    if not settings.get("console_client_id"):
        return None
    from cloudbridge_oidc.browser import OidcBrowserLogin

    return OidcBrowserLogin(settings)


def _token_source(settings: Mapping[str, Any]) -> TokenSource:
    from cloudbridge_oidc.client import OidcClient

    return OidcClient(settings)


@hookimpl
def cloudbridge_auth_providers() -> list[AuthProviderSpec]:
    return [
        AuthProviderSpec(
            name="oidc",
            load=_validator,
            token_source=_token_source,
            browser_login=_browser_login,
            description="OpenID Connect: discovery, JWKS rotation, device flow login,"
            " the relay console's browser login",
        )
    ]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="auth.oidc", schema=SETTINGS_SCHEMA)]


@hookimpl
def cloudbridge_commands(cli: click.Group) -> None:
    from cloudbridge_oidc.login_cmd import login

    cli.add_command(login)
