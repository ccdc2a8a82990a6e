"""The relay side against a real OpenID Provider: discovery, keys, rotation, refusals."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from cloudbridge_core.errors import InvalidToken, ServerUnavailable, TokenExpired
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_oidc.hooks import SETTINGS_SCHEMA
from cloudbridge_oidc.validator import OidcValidator
from oidc_provider import AUDIENCE, OpenIdProvider, new_key


def validator_for(issuer: str, **settings: Any) -> OidcValidator:
    return OidcValidator(
        plugin_settings(SETTINGS_SCHEMA, **{"issuer": issuer, "audience": AUDIENCE, **settings})
    )


def validator(provider: OpenIdProvider, **settings: Any) -> OidcValidator:
    return validator_for(provider.issuer, **settings)


def test_a_token_from_the_provider_gives_tenant_and_permissions(
    provider: OpenIdProvider,
) -> None:
    claims = asyncio.run(validator(provider).validate(provider.machine_token()))
    assert claims.tenant_id == "acme"
    assert claims.permissions == {"relay:connect", "tunnel:create", "p2p:mesh"}
    assert claims.subject == "cloudbridge-machine"
    assert claims.expires_at > time.time()


def test_wrong_audience_expired_and_forged_tokens_are_refused(provider: OpenIdProvider) -> None:
    async def main() -> None:
        other_relay = validator(provider, audience="another-relay")
        with pytest.raises(InvalidToken, match="'aud'"):
            await other_relay.validate(provider.machine_token())

        relay = validator(provider, leeway="0s")
        (key,) = provider.keys
        expired = provider.sign(key, exp=int(time.time()) - 5)
        with pytest.raises(TokenExpired):
            await relay.validate(expired)
        not_yet = provider.sign(key, nbf=int(time.time()) + 600)
        with pytest.raises(InvalidToken, match="'nbf'"):
            await relay.validate(not_yet)
        foreign = provider.sign(new_key("key-1"))  # the same kid, another key
        with pytest.raises(InvalidToken, match="signature"):
            await relay.validate(foreign)
        other_issuer = provider.sign(key, iss="http://127.0.0.1:1")
        with pytest.raises(InvalidToken, match="'iss'"):
            await relay.validate(other_issuer)
        small = validator(provider, max_token_bytes=256)
        with pytest.raises(InvalidToken, match="larger than 256 bytes"):
            await small.validate(provider.sign(key, padding="x" * 300))

    asyncio.run(main())


def test_keys_rotate_without_a_restart_and_unknown_kids_refetch_once_per_cooldown(
    provider: OpenIdProvider,
) -> None:
    async def main() -> None:
        relay = validator(provider, jwks_refetch_cooldown="1s")
        before = provider.machine_token()
        await relay.validate(before)
        # the provider rotates: new key first, the old one still published for a while
        old = provider.keys[0]
        provider.rotate(new_key("key-2"), old)
        await asyncio.sleep(1.1)  # a rotation comes later than one cooldown after a fetch
        after = provider.machine_token()
        assert (await relay.validate(after)).tenant_id == "acme"  # unknown kid: refetched
        assert (await relay.validate(before)).tenant_id == "acme"
        # a flood of tokens with a kid nobody published: at most one fetch per cooldown
        fetches = len(provider.events("jwks"))
        forged = provider.sign(new_key("nobody"), sub="mallory")
        for _ in range(20):
            with pytest.raises(InvalidToken):
                await relay.validate(forged)
        assert len(provider.events("jwks")) - fetches <= 1

    asyncio.run(main())


def test_the_jwks_cache_control_max_age_is_honoured(provider: OpenIdProvider) -> None:
    async def main() -> None:
        provider.env["JWKS_MAX_AGE"] = "1"
        provider.rotate(*provider.keys)
        relay = validator(provider, jwks_cache_ttl="1h", jwks_refetch_cooldown="1s")
        retired = provider.machine_token()
        await relay.validate(retired)
        provider.rotate(new_key("key-2"))  # key-1 withdrawn (compromised, say)
        await asyncio.sleep(1.5)
        # max-age 1s, not the 1h default: the withdrawal is seen, and the token refused
        with pytest.raises(InvalidToken):
            await relay.validate(retired)

    asyncio.run(main())


def test_discovery_problems_are_clear(provider: OpenIdProvider) -> None:
    with pytest.raises(ValueError, match=r"auth\.oidc\.audience is required"):
        OidcValidator(plugin_settings(SETTINGS_SCHEMA, issuer=provider.issuer))
    with pytest.raises(ValueError, match="must use https"):
        validator_for("http://idp.example.com")
    wrong_issuer = validator_for(f"{provider.issuer}/tenant")
    with pytest.raises(ServerUnavailable):
        asyncio.run(wrong_issuer.validate(provider.machine_token()))
