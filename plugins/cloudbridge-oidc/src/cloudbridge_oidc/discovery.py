"""OpenID Provider discovery: the issuer's metadata, fetched once and checked.

The issuer must use https, except on loopback (a provider on the same machine); the
document's ``issuer`` must be exactly the configured one, trailing slash included (OpenID
Connect Discovery 1.0, section 4.3), so a document cannot redirect trust to another
issuer; its ``jwks_uri`` must be on the issuer's origin unless ``auth.oidc.jwks_origins``
names another. Each fetch has an overall deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx2
from cloudbridge_core.api import ServerUnavailable

from cloudbridge_oidc.settings import OidcSettings

HTTP_TIMEOUT = 15.0
MAX_DOCUMENT_BYTES = 1024 * 1024


def checked_issuer(issuer: object) -> str:
    """The configured issuer URL, or ValueError naming ``auth.oidc.issuer``."""
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("auth.oidc.issuer is required (the OpenID Provider's URL)")
    parts = urllib.parse.urlsplit(issuer)
    if parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"auth.oidc.issuer {issuer!r} must be a URL without query or fragment")
    if parts.scheme != "https" and not (parts.scheme == "http" and _loopback(parts.hostname)):
        raise ValueError(f"auth.oidc.issuer {issuer!r} must use https (http only on loopback)")
    return issuer


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    jwks_uri: str
    token_endpoint: str
    device_authorization_endpoint: str | None
    authorization_endpoint: str | None = None


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, the default port left out."""
    parts = urllib.parse.urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return ""
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    suffix = "" if port in (None, default) else f":{port}"
    return f"{parts.scheme}://{host}{suffix}"


async def discover(
    issuer: str, *, deadline: float, jwks_origins: tuple[str, ...] = ()
) -> ProviderMetadata:
    """Fetch and check ``{issuer}/.well-known/openid-configuration`` (a trailing slash of
    the issuer is not doubled: section 4.1); ServerUnavailable for anything unusable."""
    url = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
    document = await fetch_json(url, deadline=deadline)
    if document.get("issuer") != issuer:
        raise ServerUnavailable(
            f"{url} names issuer {document.get('issuer')!r}, not {issuer!r}",
            hint="auth.oidc.issuer must be exactly the provider's issuer",
        )
    endpoints: dict[str, str | None] = {}
    for name in (
        "jwks_uri",
        "token_endpoint",
        "device_authorization_endpoint",
        "authorization_endpoint",
    ):
        value = document.get(name)
        if value is not None and not (isinstance(value, str) and _same_security(value, issuer)):
            raise ServerUnavailable(f"{url}: {name} {value!r} is not a usable URL")
        endpoints[name] = value
    if not endpoints["jwks_uri"] or not endpoints["token_endpoint"]:
        raise ServerUnavailable(f"{url} lacks jwks_uri or token_endpoint")
    allowed = {origin(issuer), *(origin(o) for o in jwks_origins)}
    if origin(str(endpoints["jwks_uri"])) not in allowed:
        raise ServerUnavailable(
            f"{url}: jwks_uri {endpoints['jwks_uri']!r} is not on the issuer's origin",
            hint="if the provider really serves its keys elsewhere, add that origin to"
            " auth.oidc.jwks_origins",
        )
    return ProviderMetadata(
        issuer=issuer,
        jwks_uri=str(endpoints["jwks_uri"]),
        token_endpoint=str(endpoints["token_endpoint"]),
        device_authorization_endpoint=endpoints["device_authorization_endpoint"],
        authorization_endpoint=endpoints["authorization_endpoint"],
    )


def _same_security(url: str, issuer: str) -> bool:
    """An endpoint is https, or http on loopback like an http issuer."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    return (
        parts.scheme == "http" and issuer.startswith("http://") and _loopback(parts.hostname or "")
    )


async def fetch_json(url: str, *, deadline: float = HTTP_TIMEOUT) -> dict[str, Any]:
    """The JSON object at ``url``, within ``deadline`` seconds overall (httpx's own timeouts
    bound each read, not the whole: a provider dripping bytes would hold it forever)."""
    try:
        async with asyncio.timeout(deadline), httpx2.AsyncClient(timeout=deadline) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            if len(response.content) > MAX_DOCUMENT_BYTES:
                raise ServerUnavailable(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
            document = response.json()
    except TimeoutError:
        raise ServerUnavailable(f"cannot read {url}: no answer within {deadline:g}s") from None
    except (httpx2.HTTPError, ValueError, RecursionError) as exc:
        raise ServerUnavailable(f"cannot read {url}: {exc}") from None
    if not isinstance(document, dict):
        raise ServerUnavailable(f"{url} did not answer a JSON object")
    return document


class Discovery:
    """The configured issuer's metadata, discovered at first use and then kept."""

    def __init__(self, settings: OidcSettings) -> None:
        self.issuer = checked_issuer(settings.issuer)
        self._settings = settings
        self._metadata: ProviderMetadata | None = None

    async def metadata(self) -> ProviderMetadata:
        if self._metadata is None:
            self._metadata = await discover(
                self.issuer,
                deadline=self._settings.jwks_fetch_timeout,
                jwks_origins=self._settings.jwks_origins,
            )
        return self._metadata
