"""The client side: tokens from the OpenID Provider for ``cloudbridge login`` and renewal.

- People log in with the Device Authorization Grant (RFC 8628): no client secret (the CLI
  is a public client), the browser can be on another device.
- Machines use client credentials (``auth.oidc.client_secret``).
- A refresh token, when the provider gives one, renews the access token without asking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc8628 import DEVICE_CODE_GRANT_TYPE
from cloudbridge_core.api import (
    AuthError,
    ServerUnavailable,
    TokenStore,
    build,
    get_logger,
    token_expires_in,
)

from cloudbridge_oidc.discovery import HTTP_TIMEOUT, Discovery
from cloudbridge_oidc.settings import OidcSettings

log = get_logger("auth.oidc")

#: renew a token that has less than this left, rather than let the relay refuse it
RENEW_BEFORE_SECONDS = 60.0
#: RFC 8628 section 3.5: the default polling interval, and what slow_down adds to it
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """What the user is shown: where to go and which code to check there."""

    verification_uri: str
    verification_uri_complete: str | None
    user_code: str
    expires_in: float


class OidcClient:
    """Implements :class:`cloudbridge_core.providers.TokenSource` for an OIDC issuer."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(OidcSettings, settings)
        self._discovery = Discovery(self.settings)
        self._issuer = self._discovery.issuer
        self._scope = " ".join(self.settings.scopes)

    @property
    def machine(self) -> bool:
        """A machine (client credentials) rather than a person (device flow)."""
        return self.settings.client_secret is not None

    async def obtain_token(self, store: TokenStore) -> str | None:
        token = store.load()
        left = token_expires_in(token) if token else None
        if token and (left is None or left > RENEW_BEFORE_SECONDS):
            return token
        refresh = store.load("refresh")
        try:
            if refresh:
                renewed = await self._request("refresh_token", refresh_token=refresh)
            elif self.machine:
                renewed = await self._request("client_credentials")
            else:
                return token  # expired or none: the relay says so, and login is the fix
        except AuthError as error:
            log.warning("token_renewal_failed", issuer=self._issuer, error=error.message)
            return token
        keep(store, renewed)
        return str(renewed["access_token"])

    async def client_credentials(self) -> Mapping[str, Any]:
        if not self.machine:
            raise AuthError("auth.oidc.client_secret is not set: client credentials need it")
        return await self._request("client_credentials")

    async def device_flow(self, show: Callable[[DeviceCode], None]) -> Mapping[str, Any]:
        """Ask for a device code, ``show`` it, and poll until the user has decided."""
        metadata = await self._discovery.metadata()
        if not metadata.device_authorization_endpoint:
            raise AuthError(
                f"the provider {self._issuer} does not offer the device flow",
                hint="machines can use client credentials (auth.oidc.client_secret)",
            )
        async with self._oauth() as oauth:
            try:
                response = await oauth.request(
                    "POST",
                    metadata.device_authorization_endpoint,
                    data={"client_id": self.settings.client_id, "scope": self._scope},
                    withhold_token=True,
                )
                answer = response.json()
            except (httpx2.HTTPError, ValueError) as exc:
                raise ServerUnavailable(f"device authorization request failed: {exc}") from None
        if response.status_code != 200 or "device_code" not in answer:
            raise AuthError(f"the provider refused the device flow: {_error_of(answer)}")
        expires_in = float(answer.get("expires_in", 600))
        show(
            DeviceCode(
                verification_uri=answer["verification_uri"],
                verification_uri_complete=answer.get("verification_uri_complete"),
                user_code=answer["user_code"],
                expires_in=expires_in,
            )
        )
        return await self._poll(
            answer["device_code"], float(answer.get("interval", DEFAULT_INTERVAL)), expires_in
        )

    async def _poll(
        self, device_code: str, interval: float, expires_in: float
    ) -> Mapping[str, Any]:
        deadline = time.monotonic() + expires_in
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            try:
                return await self._request(DEVICE_CODE_GRANT_TYPE, device_code=device_code)
            except _Pending as pending:
                if pending.slow_down:
                    interval += SLOW_DOWN_SECONDS
        raise AuthError(
            "the device code expired before the login was approved", hint="log in again"
        )

    async def _request(self, grant_type: str, **params: str) -> Mapping[str, Any]:
        metadata = await self._discovery.metadata()
        async with self._oauth() as oauth:
            try:
                token = await oauth.fetch_token(
                    metadata.token_endpoint, grant_type=grant_type, **params
                )
            except OAuthError as exc:
                if exc.error in ("authorization_pending", "slow_down"):
                    raise _Pending(slow_down=exc.error == "slow_down") from None
                raise AuthError(_refusal(exc.error, exc.description)) from None
            except httpx2.HTTPError as exc:
                raise ServerUnavailable(f"the token endpoint did not answer: {exc}") from None
        if not token.get("access_token"):
            raise AuthError("the provider answered no access token")
        return dict(token)

    def _oauth(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.settings.client_id,
            client_secret=self.settings.client_secret,
            token_endpoint_auth_method="client_secret_basic" if self.machine else "none",
            scope=self._scope,
            timeout=HTTP_TIMEOUT,
        )


class _Pending(Exception):
    """The user has not decided yet (``authorization_pending``, ``slow_down``)."""

    def __init__(self, *, slow_down: bool) -> None:
        super().__init__("authorization pending")
        self.slow_down = slow_down


def keep(store: TokenStore, token: Mapping[str, Any]) -> None:
    """Store the access token and, when the provider gave one, the refresh token."""
    store.save(str(token["access_token"]))
    if token.get("refresh_token"):
        store.save(str(token["refresh_token"]), "refresh")


def _refusal(error: str | None, description: str | None) -> str:
    reasons = {
        "access_denied": "the login was denied",
        "expired_token": "the device code expired before the login was approved",
        "invalid_client": "the provider does not accept this client (auth.oidc.client_id"
        " or client_secret)",
        "invalid_grant": "the provider no longer accepts the stored grant: log in again",
    }
    reason = reasons.get(error or "", f"the provider refused: {error}")
    return f"{reason} ({description})" if description and error not in reasons else reason


def _error_of(answer: object) -> str:
    if isinstance(answer, dict):
        return str(answer.get("error_description") or answer.get("error") or "no reason given")
    return "no reason given"
