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
        "issuer": {"type": ["string", "null"], "default": None, "description": "Expected iss."},
        "audience": {"type": ["string", "null"], "default": None, "description": "Expected aud."},
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
