"""JWT validation: joserfc wrapped so that nothing the token says can weaken the checks.

Before the library sees a token: its size is bounded, its header is parsed and checked
here (algorithm from our allow-list only, never ``none`` or HMAC; no key material or key
URLs from the header; no unknown ``crit``). joserfc then verifies the signature with our
keys, and its claims registry checks ``exp``/``nbf``/``iat`` with leeway and
``iss``/``aud``. Every library exception is mapped to a classified CloudBridge error whose
message never contains the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbridge_core.api import (
    Claims,
    InvalidToken,
    ServerUnavailable,
    TokenExpired,
    build,
    get_logger,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwk import ECKey, KeySet, RSAKey

log = get_logger("auth.jwt")

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"})
#: header parameters that would let the token choose its own verification key
FORBIDDEN_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c"})
JWKS_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """``auth.jwt`` as the core hands it over: validated, every default from
    ``hooks.SETTINGS_SCHEMA`` (so none here), durations in seconds."""

    public_key_file: str | None
    jwks_url: str | None
    jwks_cache_ttl: float
    jwks_refetch_cooldown: float
    issuer: str | None
    audience: str | None
    algorithms: tuple[str, ...]
    leeway: float
    tenant_claim: str
    permissions_claim: str
    max_token_bytes: int


class JwtValidator:
    """Implements :class:`cloudbridge_core.providers.AuthProvider` for signed JWTs.

    Raises ``ValueError`` naming the setting at fault for an algorithm outside
    :data:`ALLOWED_ALGORITHMS`, or when neither ``public_key_file`` nor ``jwks_url`` is set.
    """

    def __init__(self, settings: Mapping[str, Any], *, clock: Any = time.time) -> None:
        self.settings = build(JwtSettings, settings)
        self._algorithms = list(self.settings.algorithms)
        unsupported = set(self._algorithms) - ALLOWED_ALGORITHMS
        if unsupported:
            raise ValueError(f"auth.jwt.algorithms: {sorted(unsupported)} are not allowed")
        self._clock = clock
        self._keys: KeySet | None = None
        self._static_key: RSAKey | ECKey | None = None
        self._fetched_at = float("-inf")
        self._keys_ttl = self.settings.jwks_cache_ttl
        self._fetch_lock = asyncio.Lock()
        if self.settings.public_key_file:
            self._static_key = _public_key(Path(self.settings.public_key_file).read_bytes())
        elif not self.settings.jwks_url:
            raise ValueError("auth.jwt needs public_key_file or jwks_url")

    async def validate(self, token: str) -> Claims:
        max_bytes = self.settings.max_token_bytes
        if len(token) > max_bytes:
            raise InvalidToken(f"token is larger than {max_bytes} bytes")
        header = _header_of(token)
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise InvalidToken(f"token algorithm {algorithm!r} is not accepted")
        forbidden = FORBIDDEN_HEADERS & set(header)
        if forbidden:
            raise InvalidToken(
                f"token header carries key material ({', '.join(sorted(forbidden))})"
            )
        if "crit" in header:
            raise InvalidToken("token header has critical extensions this relay does not know")
        keys = await self._keys_for(header.get("kid"))
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
        except JoseError as exc:
            raise InvalidToken(f"token signature or encoding is invalid ({exc.error})") from None
        return self._check_claims(decoded.claims)

    def _check_claims(self, claims: dict[str, Any]) -> Claims:
        options: dict[str, Any] = {"exp": {"essential": True}, "sub": {"essential": True}}
        if self.settings.issuer:
            options["iss"] = {"essential": True, "value": self.settings.issuer}
        if self.settings.audience:
            options["aud"] = {"essential": True, "value": self.settings.audience}
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock()), leeway=int(self.settings.leeway), **options
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise TokenExpired("token has expired", hint="obtain a new token") from None
        except MissingClaimError as exc:
            raise InvalidToken(f"token lacks required claims ({exc.description})") from None
        except InvalidClaimError as exc:
            raise InvalidToken(f"token claim {exc.claim!r} is not acceptable") from None
        except JoseError as exc:
            raise InvalidToken(f"token claims are invalid ({exc.error})") from None
        tenant = claims.get(self.settings.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidToken(f"token has no tenant claim {self.settings.tenant_claim!r}")
        permissions = claims.get(self.settings.permissions_claim, [])
        if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
            raise InvalidToken(
                f"token claim {self.settings.permissions_claim!r} must be a list of strings"
            )
        extra: dict[str, Any] = {
            k: claims[k] for k in ("custom:mesh_config", "custom:network_config") if k in claims
        }
        return Claims(
            subject=str(claims["sub"]),
            tenant_id=tenant,
            permissions=frozenset(permissions),
            expires_at=float(claims["exp"]),
            extra=extra,
        )

    async def _keys_for(self, kid: object) -> KeySet | RSAKey | ECKey:
        if self._static_key is not None:  # one configured key: the token's kid is irrelevant
            return self._static_key
        now = self._clock()
        known = self._keys is not None and any(k.kid == kid for k in self._keys.keys)
        stale = now - self._fetched_at > self._keys_ttl
        unknown_kid = not known and now - self._fetched_at > self.settings.jwks_refetch_cooldown
        if self._keys is None or stale or unknown_kid:
            async with self._fetch_lock:
                if self._fetched_at < now:  # nobody refreshed while we waited
                    await self._refresh()
        assert self._keys is not None  # _refresh either sets keys or raises
        return self._keys

    async def _refresh(self) -> None:
        url = str(self.settings.jwks_url)
        try:
            document, max_age = await asyncio.to_thread(_fetch_json, url)
            self._keys = KeySet.import_key_set(document)
            # the issuer's Cache-Control decides, but never makes us fetch more often
            # than the cooldown allows
            self._keys_ttl = (
                self.settings.jwks_cache_ttl
                if max_age is None
                else max(max_age, self.settings.jwks_refetch_cooldown)
            )
        except (OSError, ValueError, JoseError) as exc:
            if self._keys is None:
                raise ServerUnavailable(f"cannot fetch JWKS from {url}: {exc}") from exc
            log.warning("jwks_refresh_failed", url=url, error=str(exc))
        self._fetched_at = self._clock()


def _public_key(pem: bytes) -> RSAKey | ECKey:
    """The key in a PEM file, its type stated (never guessed by the JOSE library)."""
    loaded = serialization.load_pem_public_key(pem)
    if isinstance(loaded, rsa.RSAPublicKey):
        return RSAKey.import_key(pem)
    if isinstance(loaded, ec.EllipticCurvePublicKey):
        return ECKey.import_key(pem)
    raise ValueError("auth.jwt.public_key_file must hold an RSA or EC public key")


def _header_of(token: str) -> dict[str, Any]:
    segment = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidToken("token is not a JWT") from None
    if not isinstance(header, dict):
        raise InvalidToken("token is not a JWT")
    return header


def _fetch_json(url: str) -> tuple[Any, float | None]:
    """The JSON document at ``url`` and how long its Cache-Control lets it be kept
    (None: it does not say)."""
    if not url.startswith(("https://", "http://")):
        raise ValueError("jwks_url must be an http(s) URL")
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - scheme checked above
        document = json.loads(response.read(JWKS_MAX_BYTES))
        return document, _max_age(response.headers.get("Cache-Control", ""))


def _max_age(cache_control: str) -> float | None:
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for directive in directives:
        name, _, value = directive.partition("=")
        if name == "max-age" and value.strip().isdigit():
            return float(value)
    return None
