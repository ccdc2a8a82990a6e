"""JWT validation: joserfc wrapped so that nothing the token says can weaken the checks.

Before the library sees a token: its size is bounded, its header and payload are bounded
in size and nesting before any JSON decode (no ``RecursionError`` however deep a token
nests), the header is checked here (algorithm from our allow-list only, never ``none`` or
HMAC; no key material or key URLs; no unknown ``crit``; ``typ``, when set, a JWT or an
access token). joserfc then verifies the signature with our keys, and its claims registry
checks ``iss``/``aud``/``sub``; times are checked here so that a clock-skew error names
both clocks, and ``iat`` is required, its lifetime (``exp - iat``) bounded. Every library
exception is mapped to a classified CloudBridge error whose message never contains the token.

Keys from a JWKS: RSA keys below ``min_rsa_key_bits`` are dropped, a document with two
keys of one ``kid`` is refused whole (which key would win is not ours to guess). The
fetch has an overall deadline and runs as one shared background task: a login waits for
a due refresh at most ``jwks_refresh_wait``, then uses the cached keys, which stay in use
(reported stale) until the provider answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudbridge_core.api import (
    AuthKeyStatistics,
    Claims,
    InvalidToken,
    ServerUnavailable,
    TokenExpired,
    build,
    get_logger,
    is_tenant_id,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.errors import InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwk import ECKey, KeySet, RSAKey

log = get_logger("auth.jwt")

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"})
#: header parameters that would let the token choose its own verification key
FORBIDDEN_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c"})
#: ``typ`` values of a token meant for us: a JWT, or an OAuth access token (RFC 9068)
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt"})
JWKS_MAX_BYTES = 1024 * 1024
#: a header is a handful of short fields (a security limit)
MAX_HEADER_BYTES = 2048
#: deepest nesting of objects and arrays in a header or payload (a security limit: claims
#: such as custom:mesh_config are shallow, and deep nesting exhausts a recursive parser)
MAX_JSON_DEPTH = 16
#: the longest ``jti`` kept as the token's id (a security limit: a revocation names it, and
#: the relay keeps revocations; longer ones are not ids it issued or can be asked to revoke)
MAX_TOKEN_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """``auth.jwt`` as the core hands it over: validated, every default from
    ``hooks.SETTINGS_SCHEMA`` (so none here), durations in seconds."""

    public_key_file: str | None
    jwks_url: str | None
    jwks_cache_ttl: float
    jwks_refetch_cooldown: float
    jwks_fetch_timeout: float
    jwks_refresh_wait: float
    issuer: str | None
    audience: str | None
    algorithms: tuple[str, ...]
    leeway: float
    max_token_lifetime: float
    min_rsa_key_bits: int
    tenant_claim: str
    permissions_claim: str
    max_token_bytes: int


class JwtValidator:
    """Implements :class:`cloudbridge_core.providers.KeyedAuthProvider` for signed JWTs.

    Raises ``ValueError`` naming the setting at fault for an algorithm outside
    :data:`ALLOWED_ALGORITHMS`, when neither ``public_key_file`` nor ``jwks_url`` is set,
    for ``jwks_url`` without ``audience``, or a key file holding a too small RSA key.
    ``section`` is the config section the settings came from (named in errors).
    """

    def __init__(
        self, settings: Mapping[str, Any], *, clock: Any = time.time, section: str = "auth.jwt"
    ) -> None:
        self.settings = build(JwtSettings, settings)
        self._section = section
        self._algorithms = list(self.settings.algorithms)
        unsupported = set(self._algorithms) - ALLOWED_ALGORITHMS
        if unsupported:
            raise ValueError(f"{section}.algorithms: {sorted(unsupported)} are not allowed")
        self._clock = clock
        self._keys: KeySet | None = None
        self._static_key: RSAKey | ECKey | None = None
        self._fetched_at = float("-inf")
        self._keys_ttl = self.settings.jwks_cache_ttl
        self._refresh: asyncio.Task[None] | None = None
        self._refresh_started = 0.0
        self._next_attempt = float("-inf")
        self._failures = 0
        self._problem = ""
        if self.settings.public_key_file:
            self._static_key = _public_key(
                Path(self.settings.public_key_file).read_bytes(),
                self.settings.min_rsa_key_bits,
                f"{section}.public_key_file",
            )
        elif not self.settings.jwks_url:
            raise ValueError(f"{section} needs public_key_file or jwks_url")
        elif not self.settings.audience:
            raise ValueError(
                f"{section}.audience is required with jwks_url: without it, a token the"
                " issuer signed for any other service would be accepted"
            )

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
        if "typ" in header and _media_type(header["typ"]) not in ACCEPTED_TYPES:
            raise InvalidToken("token type (typ) is neither JWT nor at+jwt")
        _check_payload_depth(token)
        keys = await self._keys_for(header.get("kid"))
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
        except JoseError as exc:
            raise InvalidToken(f"token signature or encoding is invalid ({exc.error})") from None
        return self._check_claims(decoded.claims)

    def _check_claims(self, claims: dict[str, Any]) -> Claims:
        self._check_times(claims)
        options: dict[str, Any] = {"sub": {"essential": True}}
        if self.settings.issuer:
            options["iss"] = {"essential": True, "value": self.settings.issuer}
        if self.settings.audience:
            options["aud"] = {"essential": True, "value": self.settings.audience}
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock()), leeway=int(self.settings.leeway), **options
        )
        try:
            registry.validate(claims)
        except MissingClaimError as exc:
            raise InvalidToken(f"token lacks required claims ({exc.description})") from None
        except InvalidClaimError as exc:
            raise InvalidToken(f"token claim {exc.claim!r} is not acceptable") from None
        except JoseError as exc:
            raise InvalidToken(f"token claims are invalid ({exc.error})") from None
        tenant = claims.get(self.settings.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidToken(f"token has no tenant claim {self.settings.tenant_claim!r}")
        if not is_tenant_id(tenant):  # the value is not quoted: it may be 4 KB or hold NUL
            raise InvalidToken(
                f"token claim {self.settings.tenant_claim!r} is not a tenant id"
                " (lowercase letters, digits, '.', '_', '-'; at most 63)"
            )
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
            token_id=_token_id(claims.get("jti")),
            issued_at=float(claims["iat"]),  # _check_times required it, a number
        )

    def _check_times(self, claims: dict[str, Any]) -> None:
        """``exp`` and ``iat`` required, ``nbf`` optional; errors name the token's time
        and the relay's, so a wrong clock on either side is plain to see."""
        times: dict[str, float] = {}
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is None and name != "nbf":
                raise InvalidToken(f"token lacks required claims ({name})")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidToken(f"token claim {name!r} is not a time")
            times[name] = float(value)
        now, leeway = self._clock(), self.settings.leeway
        if times["exp"] < now - leeway:
            raise TokenExpired(
                f"token expired at {_utc(times['exp'])}; relay time is {_utc(now)}",
                hint="obtain a new token (or check the clocks if that time looks wrong)",
            )
        for name, meaning in (("nbf", "is not valid before"), ("iat", "was issued at")):
            if name in times and times[name] > now + leeway:
                raise InvalidToken(
                    f"token claim {name!r}: it {meaning} {_utc(times[name])}, but relay time"
                    f" is {_utc(now)} (clock skew above {self.settings.leeway:g}s)"
                )
        lifetime, limit = times["exp"] - times["iat"], self.settings.max_token_lifetime
        if lifetime > limit:
            raise InvalidToken(
                f"token lifetime (exp - iat) of {lifetime:.0f}s exceeds"
                f" {self._section}.max_token_lifetime ({limit:.0f}s)"
            )

    # ---- keys ------------------------------------------------------------------------

    async def load_keys(self) -> None:
        """Fetch the JWKS now (a key file is already loaded); ServerUnavailable if it
        cannot be had within ``jwks_fetch_timeout``."""
        if self._static_key is None and self._keys is None:
            await self._await_refresh(None)
            if self._keys is None:
                raise ServerUnavailable(
                    f"cannot fetch JWKS from {self.settings.jwks_url}: {self._problem}"
                )

    def statistics(self) -> AuthKeyStatistics:
        if self._static_key is not None:
            return AuthKeyStatistics(loaded=True, stale=False, refresh_failures=0)
        loaded = self._keys is not None
        stale = loaded and self._clock() - self._fetched_at > self._keys_ttl
        return AuthKeyStatistics(
            loaded=loaded,
            stale=stale,
            refresh_failures=self._failures,
            problem=self._problem if stale or not loaded else "",
        )

    async def _keys_for(self, kid: object) -> KeySet | RSAKey | ECKey:
        if self._static_key is not None:  # one configured key: the token's kid is irrelevant
            return self._static_key
        now = self._clock()
        if now >= self._next_attempt:  # after a failure, the next try waits for the cooldown
            known = self._keys is not None and any(k.kid == kid for k in self._keys.keys)
            stale = now - self._fetched_at > self._keys_ttl
            since_fetch = now - self._fetched_at
            unknown_kid = not known and since_fetch > self.settings.jwks_refetch_cooldown
            if self._keys is None:
                await self._await_refresh(None)
            elif stale or unknown_kid:
                await self._await_refresh(self.settings.jwks_refresh_wait)
        if self._keys is None:
            raise ServerUnavailable(
                f"cannot fetch JWKS from {self.settings.jwks_url}: {self._problem}"
            )
        return self._keys

    async def _await_refresh(self, wait: float | None) -> None:
        """Start the one refresh (unless it runs) and wait for it: with cached keys at most
        ``wait`` seconds from the refresh's start (so logins during a hung fetch do not
        wait at all), without them until its own deadline. A login giving up never
        cancels it."""
        loop = asyncio.get_running_loop()
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._run_refresh())
            self._refresh_started = loop.time()
        if wait is not None:
            wait = max(0.0, self._refresh_started + wait - loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._refresh), wait)

    async def _run_refresh(self) -> None:
        url = str(self.settings.jwks_url)
        deadline = self.settings.jwks_fetch_timeout
        try:
            async with asyncio.timeout(deadline):
                document, max_age = await asyncio.to_thread(_fetch_json, url, deadline)
            keys = _key_set(document, self.settings.min_rsa_key_bits)
        except TimeoutError:
            self._failed(url, f"no answer within {deadline:g}s")
            return
        except (OSError, ValueError, JoseError) as exc:
            self._failed(url, str(exc))
            return
        self._keys = keys
        # the issuer's Cache-Control decides, but never makes us fetch more often than the
        # cooldown allows
        self._keys_ttl = (
            self.settings.jwks_cache_ttl
            if max_age is None
            else max(max_age, self.settings.jwks_refetch_cooldown)
        )
        self._fetched_at = self._clock()
        self._next_attempt = float("-inf")
        self._problem = ""

    def _failed(self, url: str, problem: str) -> None:
        self._failures += 1
        self._problem = problem
        self._next_attempt = self._clock() + self.settings.jwks_refetch_cooldown
        if self._keys is not None:  # they stay in use until the provider answers
            log.warning("jwks_stale", url=url, error=problem, failures=self._failures)
        else:
            log.warning("jwks_fetch_failed", url=url, error=problem, failures=self._failures)


def _token_id(jti: object) -> str | None:
    """The token's ``jti`` when it is a usable id: a short non-empty string."""
    if isinstance(jti, str) and 0 < len(jti) <= MAX_TOKEN_ID_LENGTH:
        return jti
    return None


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _media_type(typ: object) -> str:
    """RFC 7515 4.1.9: ``typ`` is a media type, ``application/`` may be left out."""
    if not isinstance(typ, str):
        return ""
    typ = typ.lower()
    return typ.removeprefix("application/")


def _public_key(pem: bytes, min_rsa_bits: int, setting: str) -> RSAKey | ECKey:
    """The key in a PEM file, its type stated (never guessed by the JOSE library)."""
    loaded = serialization.load_pem_public_key(pem)
    if isinstance(loaded, rsa.RSAPublicKey):
        if loaded.key_size < min_rsa_bits:
            raise ValueError(
                f"{setting}: an RSA key of {loaded.key_size} bits is too small"
                f" (at least {min_rsa_bits}, min_rsa_key_bits)"
            )
        return RSAKey.import_key(pem)
    if isinstance(loaded, ec.EllipticCurvePublicKey):
        return ECKey.import_key(pem)
    raise ValueError(f"{setting} must hold an RSA or EC public key")


def _key_set(document: Any, min_rsa_bits: int) -> KeySet:
    """The usable keys of a JWKS document: ValueError for two keys with one ``kid`` or
    none left; small RSA keys are left out (and logged) before the library sees them."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("the JWKS has no list of keys")
    named = [str(entry["kid"]) for entry in entries if "kid" in entry]
    if len(named) != len(set(named)):
        raise ValueError("the JWKS has two keys with one kid (refused: which one is meant?)")
    usable = []
    for entry in entries:
        bits = _rsa_bits(entry) if entry.get("kty") == "RSA" else None
        if bits is not None and bits < min_rsa_bits:
            log.warning("jwks_key_refused", kid=str(entry.get("kid")), bits=bits)
            continue
        usable.append(entry)
    if not usable:
        raise ValueError("the JWKS has no usable key")
    return KeySet.import_key_set({"keys": usable})


def _rsa_bits(entry: Mapping[str, Any]) -> int:
    modulus = entry.get("n")
    if not isinstance(modulus, str):
        raise ValueError("an RSA key of the JWKS has no modulus")
    raw = base64.urlsafe_b64decode(modulus + "=" * (-len(modulus) % 4))
    return int.from_bytes(raw, "big").bit_length()


def _b64_json_segment(segment: str, max_bytes: int, what: str) -> bytes:
    if len(segment) > max_bytes * 4 // 3 + 4:
        raise InvalidToken(f"token {what} is larger than {max_bytes} bytes")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error):
        raise InvalidToken("token is not a JWT") from None
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise InvalidToken(f"token {what} nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def _header_of(token: str) -> dict[str, Any]:
    data = _b64_json_segment(token.split(".", 1)[0], MAX_HEADER_BYTES, "header")
    try:
        header = json.loads(data)
    except ValueError:
        raise InvalidToken("token is not a JWT") from None
    if not isinstance(header, dict):
        raise InvalidToken("token is not a JWT")
    return header


def _check_payload_depth(token: str) -> None:
    """The payload is decoded by joserfc; its nesting is bounded here first."""
    parts = token.split(".")
    if len(parts) == 3:
        _b64_json_segment(parts[1], len(token), "payload")


def _json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, strings skipped; no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _fetch_json(url: str, timeout: float) -> tuple[Any, float | None]:
    """The JSON document at ``url`` and how long its Cache-Control lets it be kept
    (None: it does not say). ``timeout`` bounds each socket operation; the caller bounds
    the whole."""
    if not url.startswith(("https://", "http://")):
        raise ValueError("jwks_url must be an http(s) URL")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - scheme checked above
        data = response.read(JWKS_MAX_BYTES)
        if _json_depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"the JWKS nests deeper than {MAX_JSON_DEPTH} levels")
        document = json.loads(data)
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
