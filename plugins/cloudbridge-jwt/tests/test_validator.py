"""JWT validation against real keys and a real JWKS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.errors import InvalidToken, TokenExpired
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_jwt import hooks
from cloudbridge_jwt.validator import JwtValidator
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

ISSUER = "https://relay.example.com"
AUDIENCE = "cloudbridge"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "laptop",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "custom:tenant_id": "acme",
        "custom:permissions": ["relay:connect", "tunnel:create"],
        "custom:mesh_config": {"peer_ip": "100.96.0.5"},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def settings(**overrides: Any) -> Mapping[str, Any]:
    values = {"issuer": ISSUER, "audience": AUDIENCE, **overrides}
    return plugin_settings(hooks.SETTINGS_SCHEMA, **values)


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


@pytest.fixture
def key_file(rsa_key: RSAKey, tmp_path: Path) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(rsa_key.as_pem(private=False))
    return path


def sign(key: RSAKey | ECKey, body: dict[str, Any], alg: str = "RS256") -> str:
    return jwt.encode({"alg": alg, "kid": key.kid}, body, key)


def validate(validator: JwtValidator, token: str) -> Any:
    return asyncio.run(validator.validate(token))


def test_plugin_is_discovered_with_its_section() -> None:
    [record] = [r for r in load_plugins().records if r.name == "jwt"]
    assert record.status == "active"
    assert record.providers == {"auth_provider": ["jwt"]}


def test_valid_token_gives_claims(rsa_key: RSAKey, key_file: Path) -> None:
    validator = JwtValidator(settings(public_key_file=str(key_file)))
    result = validate(validator, sign(rsa_key, claims()))
    assert (result.tenant_id, result.subject) == ("acme", "laptop")
    assert result.permissions == frozenset({"relay:connect", "tunnel:create"})
    assert result.extra == {"custom:mesh_config": {"peer_ip": "100.96.0.5"}}
    assert (result.token_id, result.issued_at) == (None, float(claims()["iat"]))


@pytest.mark.parametrize(
    ("jti", "token_id"),
    [("a1b2c3", "a1b2c3"), ("", None), ("x" * 257, None)],
    ids=["string", "empty", "too-long"],
)
def test_token_id_comes_from_a_short_string_jti(
    rsa_key: RSAKey, key_file: Path, jti: object, token_id: str | None
) -> None:
    validator = JwtValidator(settings(public_key_file=str(key_file)))
    assert validate(validator, sign(rsa_key, claims(jti=jti))).token_id == token_id


def hs256_signed_with(secret: bytes) -> str:
    """The classic confusion attack: HMAC keyed with the RSA public key."""
    header = b64(json.dumps({"alg": "HS256"}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims()).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def forge(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda k, pem: sign(k, claims(exp=int(time.time()) - 120)), TokenExpired, "expired"),
        (lambda k, pem: sign(k, claims(nbf=int(time.time()) + 600)), InvalidToken, "'nbf'"),
        (lambda k, pem: sign(k, claims(iss="https://evil.example.com")), InvalidToken, "'iss'"),
        (lambda k, pem: sign(k, claims(aud="someone-else")), InvalidToken, "'aud'"),
        (
            lambda k, pem: sign(k, claims(**{"custom:tenant_id": None})),
            InvalidToken,
            "no tenant claim",
        ),
        (lambda k, pem: sign(k, claims(exp=None)), InvalidToken, "lacks required claims"),
        (
            lambda k, pem: sign(RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}), claims()),
            InvalidToken,
            "signature",
        ),
        (lambda k, pem: forge({"alg": "none"}, claims()), InvalidToken, "'none' is not accepted"),
        (lambda k, pem: hs256_signed_with(pem), InvalidToken, "'HS256' is not accepted"),
        (
            lambda k, pem: forge(
                {"alg": "RS256", "jku": "https://evil.example.com/jwks"}, claims()
            ),
            InvalidToken,
            "key material",
        ),
        (
            lambda k, pem: forge({"alg": "RS256", "jwk": {"kty": "RSA"}}, claims()),
            InvalidToken,
            "key material",
        ),
        (
            lambda k, pem: forge({"alg": "RS256", "crit": ["exp"]}, claims()),
            InvalidToken,
            "critical",
        ),
        (lambda k, pem: "x" * 9000, InvalidToken, "larger than"),
        (lambda k, pem: "not-a-jwt", InvalidToken, "not a JWT"),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "wrong-iss",
        "wrong-aud",
        "no-tenant",
        "no-exp",
        "bad-signature",
        "alg-none",
        "hs256-with-public-key",
        "jku",
        "jwk",
        "crit",
        "oversized",
        "garbage",
    ],
)
def test_rejections(
    rsa_key: RSAKey, key_file: Path, make: Any, error: type[Exception], message: str
) -> None:
    validator = JwtValidator(settings(public_key_file=str(key_file)))
    token = make(rsa_key, key_file.read_bytes())
    with pytest.raises(error, match=message) as caught:
        validate(validator, token)
    assert token not in str(caught.value)


class JwksServer:
    """A real HTTP server on loopback serving a JWKS document that tests can rotate."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    thread.join()


def test_jwks_rotation_refetches_on_unknown_kid_with_cooldown(jwks: JwksServer) -> None:
    first = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
    second = ECKey.generate_key("P-256", parameters={"kid": "ec-2"})
    jwks.document = KeySet([first]).as_dict(private=False)
    now = [1_000_000.0]
    validator = JwtValidator(
        settings(jwks_url=jwks.url, jwks_refetch_cooldown="30s"), clock=lambda: now[0]
    )
    body = claims(iat=int(now[0]), nbf=int(now[0]), exp=int(now[0]) + 3600)

    async def scenario() -> None:
        assert (await validator.validate(sign(first, body, "ES256"))).tenant_id == "acme"
        assert jwks.fetches == 1
        jwks.document = KeySet([first, second]).as_dict(private=False)
        with pytest.raises(InvalidToken):  # the unknown kid came within the cooldown
            await validator.validate(sign(second, body, "ES256"))
        assert jwks.fetches == 1
        now[0] += 31
        assert (await validator.validate(sign(second, body, "ES256"))).subject == "laptop"
        assert jwks.fetches == 2
        await validator.validate(sign(first, body, "ES256"))
        assert jwks.fetches == 2  # known kids never refetch

    asyncio.run(scenario())
