"""The relay side: tokens from an OpenID Provider, checked as JWTs with the keys and the
issuer that discovery finds (cloudbridge-jwt does the checking: JWKS cache, Cache-Control,
refetch on an unknown ``kid`` at most once per cooldown, ``iss``/``aud``/``exp``/``nbf``/
``iat`` with leeway, key sizes, a hung provider never blocking logins with cached keys).

The relay calls :meth:`OidcValidator.load_keys` at start-up, so a wrong issuer or an
unreachable provider shows at once (and ``/readyz`` waits for it), not at the first login.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from cloudbridge_core.api import AuthKeyStatistics, Claims, ServerUnavailable, build
from cloudbridge_jwt.validator import JwtValidator

from cloudbridge_oidc.discovery import checked_issuer, discover
from cloudbridge_oidc.hooks import SHARED_WITH_JWT
from cloudbridge_oidc.settings import OidcSettings


class OidcValidator:
    """Implements :class:`cloudbridge_core.providers.KeyedAuthProvider` for an OIDC issuer.

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
        self._failures = 0
        self._problem = ""

    async def validate(self, token: str) -> Claims:
        return await (await self._validator()).validate(token)

    async def load_keys(self) -> None:
        await (await self._validator()).load_keys()

    def statistics(self) -> AuthKeyStatistics:
        if self._jwt is None:
            return AuthKeyStatistics(
                loaded=False, stale=False, refresh_failures=self._failures, problem=self._problem
            )
        keys = self._jwt.statistics()
        return AuthKeyStatistics(
            loaded=keys.loaded,
            stale=keys.stale,
            refresh_failures=self._failures + keys.refresh_failures,
            problem=keys.problem,
        )

    async def _validator(self) -> JwtValidator:
        """Discovery runs once, at start-up or on the first token; a failure is retried by
        the next call (each within ``jwks_fetch_timeout``)."""
        async with self._discovering:
            if self._jwt is None:
                try:
                    metadata = await discover(
                        self._issuer,
                        deadline=self.settings.jwks_fetch_timeout,
                        jwks_origins=self.settings.jwks_origins,
                    )
                except ServerUnavailable as exc:
                    self._failures += 1
                    self._problem = exc.message
                    raise
                # a complete auth.jwt section: the shared values are already converted
                # (durations in seconds), and the keys come from discovery
                self._jwt = JwtValidator(
                    {
                        **{key: getattr(self.settings, key) for key in SHARED_WITH_JWT},
                        "public_key_file": None,
                        "jwks_url": metadata.jwks_uri,
                        "issuer": metadata.issuer,
                        "audience": self.settings.audience,
                    },
                    section="auth.oidc",
                )
        return self._jwt
