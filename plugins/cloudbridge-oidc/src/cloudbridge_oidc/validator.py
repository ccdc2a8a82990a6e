"""The relay side: tokens from an OpenID Provider, checked as JWTs with the keys and the
issuer that discovery finds (cloudbridge-jwt does the checking: JWKS cache, Cache-Control,
refetch on an unknown ``kid`` at most once per cooldown, ``iss``/``aud``/``exp``/``nbf``
with leeway)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import Claims, build
from cloudbridge_jwt.validator import JwtValidator

from cloudbridge_oidc.discovery import checked_issuer, discover
from cloudbridge_oidc.hooks import SHARED_WITH_JWT
from cloudbridge_oidc.settings import OidcSettings


class OidcValidator:
    """Implements :class:`cloudbridge_core.providers.AuthProvider` for an OIDC issuer.

    Raises ``ValueError`` naming ``auth.oidc.issuer`` or ``auth.oidc.audience`` when one
    is missing or the issuer is not an https URL (http only on loopback).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(OidcSettings, settings)
        self._issuer = checked_issuer(self.settings.issuer)
        if not self.settings.audience:
            raise ValueError(
                "auth.oidc.audience is required on the relay: without it, a token the issuer"
                " signed for any other application would be accepted"
            )
        self._jwt: JwtValidator | None = None
        self._discovering = asyncio.Lock()

    async def validate(self, token: str) -> Claims:
        return await (await self._validator()).validate(token)

    async def _validator(self) -> JwtValidator:
        """Discovery runs once, on the first token; a failure is retried by the next."""
        async with self._discovering:
            if self._jwt is None:
                metadata = await discover(self._issuer)
                # a complete auth.jwt section: the shared values are already converted
                # (durations in seconds), and the keys come from discovery
                self._jwt = JwtValidator(
                    {
                        **{key: getattr(self.settings, key) for key in SHARED_WITH_JWT},
                        "public_key_file": None,
                        "jwks_url": metadata.jwks_uri,
                        "issuer": metadata.issuer,
                        "audience": self.settings.audience,
                    }
                )
        return self._jwt
