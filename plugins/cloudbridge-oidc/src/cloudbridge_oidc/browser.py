"""The relay console's browser login (``auth.oidc.console_client_id``): the authorization
code flow with PKCE (RFC 7636, S256) for a public client; the relay validates the access
token it yields like any other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx2
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from cloudbridge_core.api import AuthError, ServerUnavailable, build

from cloudbridge_oidc.discovery import HTTP_TIMEOUT, Discovery
from cloudbridge_oidc.settings import OidcSettings


class OidcBrowserLogin:
    """Implements :class:`cloudbridge_core.providers.BrowserLogin` for an OIDC issuer."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(OidcSettings, settings)
        self._discovery = Discovery(self.settings)
        self._issuer = self._discovery.issuer
        if not self.settings.console_client_id:
            raise ValueError("auth.oidc.console_client_id is not set")
        self._client_id = self.settings.console_client_id

    async def authorization_url(self, redirect_uri: str, state: str, code_verifier: str) -> str:
        metadata = await self._discovery.metadata()
        if not metadata.authorization_endpoint:
            raise AuthError(
                f"the provider {self._issuer} offers no browser login (authorization_endpoint)",
                hint="log in with a token instead, or unset auth.oidc.console_client_id",
            )
        async with self._oauth(redirect_uri) as oauth:
            url, _ = oauth.create_authorization_url(
                metadata.authorization_endpoint, state=state, code_verifier=code_verifier
            )
        return str(url)

    async def exchange(self, code: str, redirect_uri: str, code_verifier: str) -> str:
        metadata = await self._discovery.metadata()
        async with self._oauth(redirect_uri) as oauth:
            try:
                token = await oauth.fetch_token(
                    metadata.token_endpoint,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
            except OAuthError as exc:
                raise AuthError(f"the provider refused the login: {exc.error}") from None
            except httpx2.HTTPError as exc:
                raise ServerUnavailable(f"the token endpoint did not answer: {exc}") from None
        access = token.get("access_token")
        if not access:
            raise AuthError("the provider answered no access token")
        return str(access)

    def _oauth(self, redirect_uri: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self._client_id,
            token_endpoint_auth_method="none",  # noqa: S106 - a public client: no secret
            redirect_uri=redirect_uri,
            scope=" ".join(self.settings.scopes),
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT,
        )
