"""Hooks of the `jwt` plugin: the auth provider and its config section (nothing heavy here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import AuthProvider, AuthProviderSpec, ConfigSection, hookimpl

DURATION = {"$ref": "#/$defs/duration"}

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "public_key_file": {
            "type": ["string", "null"],
            "default": None,
            "description": "PEM public key that signs tokens.",
            "x-cloudbridge-path": "file",
        },
        "jwks_url": {
            "type": ["string", "null"],
            "pattern": "^https?://",
            "default": None,
            "description": "JWKS URL of the token issuer.",
        },
        "jwks_cache_ttl": {
            **DURATION,
            "default": "1h",
            "description": "How long fetched keys are kept when the JWKS response has no"
            " Cache-Control max-age.",
        },
        "jwks_refetch_cooldown": {
            **DURATION,
            "default": "30s",
            "description": "An unknown key id refetches the JWKS at most this often.",
        },
        "jwks_fetch_timeout": {
            **DURATION,
            "default": "10s",
            "minDuration": "100ms",
            "description": "Overall deadline of one JWKS (or OIDC discovery) fetch, from"
            " connecting to the last byte. At least 100ms.",
        },
        "jwks_refresh_wait": {
            **DURATION,
            "default": "1s",
            "description": "How long a login waits for a due JWKS refresh; after that it is"
            " checked with the cached keys while the refresh goes on in the background (a"
            " provider that hangs never blocks logins). 0s: never wait.",
        },
        "issuer": {"type": ["string", "null"], "default": None, "description": "Expected iss."},
        "audience": {
            "type": ["string", "null"],
            "default": None,
            "description": "Expected aud; required with jwks_url (tokens from outside the relay).",
        },
        "algorithms": {
            "type": "array",
            "items": {"enum": ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]},
            "minItems": 1,
            "uniqueItems": True,
            "default": ["RS256", "ES256"],
            "description": "Accepted signature algorithms; the token header never widens this.",
        },
        "leeway": {
            **DURATION,
            "default": "30s",
            "description": "Clock skew allowed on exp/nbf/iat.",
        },
        "max_token_lifetime": {
            **DURATION,
            "default": "30d",
            "minDuration": "1m",
            "description": "Tokens whose exp - iat is longer are refused (a security limit)."
            " With the relay's own key, server.max_token_ttl is used instead. At least 1m.",
        },
        "min_rsa_key_bits": {
            "type": "integer",
            "minimum": 2048,
            "maximum": 16384,
            "default": 2048,
            "description": "Smaller RSA keys, from the key file or the JWKS, are refused"
            " (a security limit).",
        },
        "tenant_claim": {"type": "string", "minLength": 1, "default": "custom:tenant_id"},
        "permissions_claim": {"type": "string", "minLength": 1, "default": "custom:permissions"},
        "max_token_bytes": {
            "type": "integer",
            "minimum": 256,
            "maximum": 65536,
            "default": 8192,
            "description": "Larger tokens are refused before decoding (a security limit).",
        },
    },
}


def _load(settings: Mapping[str, Any]) -> AuthProvider:
    from cloudbridge_jwt.validator import JwtValidator

    return JwtValidator(settings)


@hookimpl
def cloudbridge_auth_providers() -> list[AuthProviderSpec]:
    return [AuthProviderSpec(name="jwt", load=_load, description="RS256/ES256 JWT validation")]


@hookimpl
def cloudbridge_config_schema() -> list[ConfigSection]:
    return [ConfigSection(path="auth.jwt", schema=SETTINGS_SCHEMA)]
