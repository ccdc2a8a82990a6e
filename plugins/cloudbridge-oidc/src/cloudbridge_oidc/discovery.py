"""OpenID Provider discovery: the issuer's metadata, fetched once and checked.

The issuer must use https, except on loopback (a provider on the same machine); the
document's ``issuer`` must be exactly the configured one (OpenID Connect Discovery 1.0,
section 4.3), so a document cannot redirect trust to another issuer.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx2
from cloudbridge_core.api import ServerUnavailable

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
    return issuer.rstrip("/")


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


async def discover(issuer: str) -> ProviderMetadata:
    """Fetch and check ``{issuer}/.well-known/openid-configuration``."""
    url = f"{issuer}/.well-known/openid-configuration"
    document = await fetch_json(url)
    if document.get("issuer", "").rstrip("/") != issuer:
        raise ServerUnavailable(
            f"{url} names issuer {document.get('issuer')!r}, not {issuer!r}",
            hint="auth.oidc.issuer must be exactly the provider's issuer",
        )
    endpoints: dict[str, str | None] = {}
    for name in ("jwks_uri", "token_endpoint", "device_authorization_endpoint"):
        value = document.get(name)
        if value is not None and not (isinstance(value, str) and _same_security(value, issuer)):
            raise ServerUnavailable(f"{url}: {name} {value!r} is not a usable URL")
        endpoints[name] = value
    if not endpoints["jwks_uri"] or not endpoints["token_endpoint"]:
        raise ServerUnavailable(f"{url} lacks jwks_uri or token_endpoint")
    return ProviderMetadata(
        issuer=issuer,
        jwks_uri=str(endpoints["jwks_uri"]),
        token_endpoint=str(endpoints["token_endpoint"]),
        device_authorization_endpoint=endpoints["device_authorization_endpoint"],
    )


def _same_security(url: str, issuer: str) -> bool:
    """An endpoint is https, or http on loopback like an http issuer."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    return (
        parts.scheme == "http" and issuer.startswith("http://") and _loopback(parts.hostname or "")
    )


async def fetch_json(url: str) -> dict[str, Any]:
    try:
        async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            if len(response.content) > MAX_DOCUMENT_BYTES:
                raise ServerUnavailable(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
            document = response.json()
    except (httpx2.HTTPError, ValueError) as exc:
        raise ServerUnavailable(f"cannot read {url}: {exc}") from None
    if not isinstance(document, dict):
        raise ServerUnavailable(f"{url} did not answer a JSON object")
    return document
