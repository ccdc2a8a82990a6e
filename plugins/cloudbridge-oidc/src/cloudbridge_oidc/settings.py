"""``auth.oidc`` as the core hands it over, read by the relay's validator and the client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """Validated, every default from ``hooks.SETTINGS_SCHEMA`` (so none here), durations in
    seconds. The JWT checks' keys are cloudbridge-jwt's (``hooks.SHARED_WITH_JWT``)."""

    issuer: str | None
    audience: str | None
    client_id: str
    client_secret: str | None = field(repr=False)
    console_client_id: str | None
    scopes: tuple[str, ...]
    jwks_origins: tuple[str, ...]
    algorithms: tuple[str, ...]
    leeway: float
    jwks_cache_ttl: float
    jwks_refetch_cooldown: float
    jwks_fetch_timeout: float
    jwks_refresh_wait: float
    max_token_lifetime: float
    min_rsa_key_bits: int
    tenant_claim: str
    permissions_claim: str
    max_token_bytes: int
