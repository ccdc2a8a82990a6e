"""Strict tokens and keys (issue 14): key sizes, duplicate kids, iat, lifetime, typ,
audience, bounded parsing, tenant ids, clock-skew messages, and keys that keep flowing
while the JWKS endpoint hangs. Real keys, a real JWKS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.errors import InvalidToken, ServerUnavailable, TokenExpired
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_core.testing.waiting import until
from cloudbridge_jwt import hooks
from cloudbridge_jwt.validator import JwtValidator, _json_depth
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

ISSUER = "https://relay.example.com"
AUDIENCE = "cloudbridge"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Key:
    """An RSA key of any size (the JOSE library warns below 2048 bits, so we sign here)."""

    def __init__(self, kid: str, bits: int = 2048) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=bits)

    def jwk(self) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()

        def encode(value: int) -> str:
            return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

        return {"kty": "RSA", "kid": self.kid, "n": encode(numbers.n), "e": encode(numbers.e)}

    def pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, body: dict[str, Any], **header: Any) -> str:
        head = {"alg": "RS256", "kid": self.kid, **header}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}"
        signature = self.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def key() -> Key:
    return Key("rsa-1")


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims issued now (or at ``now=``), with ``overrides``; None removes one."""
    now = overrides.pop("now", None)
    issued = int(time.time() if now is None else now)
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "laptop",
        "iat": issued,
        "exp": issued + 3600,
        "custom:tenant_id": "acme",
        "custom:permissions": ["relay:connect"],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def settings_for(**overrides: Any) -> Mapping[str, Any]:
    return plugin_settings(
        hooks.SETTINGS_SCHEMA, **{"issuer": ISSUER, "audience": AUDIENCE, **overrides}
    )


def with_file(key: Key, tmp_path: Path, **overrides: Any) -> JwtValidator:
    path = tmp_path / f"{key.kid}.pem"
    path.write_bytes(key.pem())
    return JwtValidator(settings_for(public_key_file=str(path), **overrides))


def validate(validator: JwtValidator, token: str) -> Any:
    return asyncio.run(validator.validate(token))


class JwksServer:
    """A JWKS endpoint on loopback that can be told to hang: it then accepts, reads the
    request and never answers (until the test ends)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.requests = 0
        self.hang = False
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if outer.hang:
                    outer.release.wait(60)
                    return
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"


@pytest.fixture
def serve_jwks() -> Iterator[Any]:
    servers: list[JwksServer] = []

    def start(*keys: Key, extra: list[dict[str, Any]] | None = None) -> JwksServer:
        server = JwksServer({"keys": [k.jwk() for k in keys] + (extra or [])})
        threading.Thread(target=server.server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.server.shutdown()
        server.server.server_close()


# ---- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1024, 1536])
def test_a_small_rsa_key_file_is_refused_naming_the_setting(tmp_path: Path, bits: int) -> None:
    with pytest.raises(ValueError, match=rf"public_key_file: an RSA key of {bits} bits.*2048"):
        with_file(Key("weak", bits), tmp_path)


def test_small_rsa_keys_from_a_jwks_are_refused(key: Key, serve_jwks: Any) -> None:
    weak, weaker = Key("weak-1536", 1536), Key("weak-1024", 1024)
    server = serve_jwks(key, weak, weaker)
    validator = JwtValidator(settings_for(jwks_url=server.url))
    assert validate(validator, key.sign(claims())).tenant_id == "acme"
    for small in (weak, weaker):
        with pytest.raises(InvalidToken):
            validate(validator, small.sign(claims()))


def test_two_keys_with_one_kid_fail_closed(key: Key, serve_jwks: Any) -> None:
    impostor = Key(key.kid)
    server = serve_jwks(impostor, key)  # the impostor first: it used to win silently
    validator = JwtValidator(settings_for(jwks_url=server.url))
    for signer in (impostor, key):
        with pytest.raises(ServerUnavailable, match="two keys with one kid"):
            validate(validator, signer.sign(claims()))


def test_jwks_url_without_audience_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"auth\.jwt\.audience is required with jwks_url"):
        JwtValidator(
            plugin_settings(hooks.SETTINGS_SCHEMA, jwks_url="https://idp.example.com/jwks")
        )


# ---- claims and header -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (claims(iat=None), {}, r"lacks required claims \(iat\)"),
        (
            claims(exp=int(time.time()) + 40 * 24 * 3600),
            {},
            r"lifetime .* exceeds auth\.jwt\.max_token_lifetime \(2592000s\)",
        ),
        (claims(), {"typ": "dpop+jwt"}, "typ"),
        (claims(), {"typ": "JWE"}, "typ"),
        (claims(), {"typ": 7}, "typ"),
        (claims(**{"custom:tenant_id": "*"}), {}, "not a tenant id"),
        (claims(**{"custom:tenant_id": "a" * 4096}), {}, "not a tenant id"),
        (claims(**{"custom:tenant_id": "acme\x00"}), {}, "not a tenant id"),
        (claims(**{"custom:tenant_id": "../../x"}), {}, "not a tenant id"),
        (claims(**{"custom:tenant_id": "Acme"}), {}, "not a tenant id"),
        (claims(**{"custom:tenant_id": "acme\n"}), {}, "not a tenant id"),
    ],
    ids=[
        "no-iat",
        "lifetime-40d",
        "typ-dpop",
        "typ-jwe",
        "typ-not-a-string",
        "tenant-star",
        "tenant-4k",
        "tenant-nul",
        "tenant-dotdot",
        "tenant-uppercase",
        "tenant-newline",
    ],
)
def test_strict_claims_and_header(
    key: Key, tmp_path: Path, body: dict[str, Any], header: dict[str, Any], message: str
) -> None:
    validator = with_file(key, tmp_path)
    with pytest.raises(InvalidToken, match=message) as caught:
        validate(validator, key.sign(body, **header))
    assert "a" * 100 not in str(caught.value)
    assert "\x00" not in str(caught.value)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", None])
def test_token_types_meant_for_us_pass(key: Key, tmp_path: Path, typ: str | None) -> None:
    header = {} if typ is None else {"typ": typ}
    assert validate(with_file(key, tmp_path), key.sign(claims(), **header)).subject == "laptop"


def test_the_lifetime_limit_is_a_setting(key: Key, tmp_path: Path) -> None:
    long_lived = key.sign(claims(exp=int(time.time()) + 40 * 24 * 3600))
    validator = with_file(key, tmp_path, max_token_lifetime="60d")
    assert validate(validator, long_lived).tenant_id == "acme"


@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_json_is_refused_without_recursion_error(
    key: Key, tmp_path: Path, where: str
) -> None:
    deep = "[" * 5000 + "]" * 5000
    header = {"alg": "RS256"}
    body = json.dumps(header)[:-1] + ', "x": ' + deep + "}" if where == "header" else deep
    segments = (body, "{}") if where == "header" else (json.dumps(header), body)
    token = ".".join(b64(segment.encode()) for segment in segments) + ".c2ln"
    validator = with_file(key, tmp_path, max_token_bytes=65536)
    with pytest.raises(InvalidToken, match=f"token {where} (nests deeper|is larger)"):
        validate(validator, token)


def test_clock_skew_errors_name_the_token_time_and_the_relay_time(key: Key, tmp_path: Path) -> None:
    relay_now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    path = tmp_path / "key.pem"
    path.write_bytes(key.pem())
    validator = JwtValidator(
        settings_for(public_key_file=str(path), leeway="30s"), clock=lambda: relay_now
    )
    expired = key.sign(claims(now=relay_now - 7200))
    with pytest.raises(TokenExpired) as caught:
        validate(validator, expired)
    assert "2027-01-15T07:00:00Z" in str(caught.value)  # the token's exp
    assert "relay time is 2027-01-15T08:00:00Z" in str(caught.value)
    from_the_future = key.sign(claims(now=relay_now + 600))
    with pytest.raises(InvalidToken, match=r"2027-01-15T08:10:00Z.*relay time is 2027-01-15"):
        validate(validator, from_the_future)


# ---- a hanging provider ----------------------------------------------------------------


def test_cached_keys_keep_working_while_the_jwks_endpoint_hangs(key: Key, serve_jwks: Any) -> None:
    server = serve_jwks(key)
    now = [1_800_000_000.0]
    validator = JwtValidator(
        settings_for(jwks_url=server.url, jwks_cache_ttl="10m", jwks_fetch_timeout="2s"),
        clock=lambda: now[0],
    )
    token = key.sign(claims(now=now[0]))

    async def scenario() -> None:
        assert (await validator.validate(token)).tenant_id == "acme"
        assert not validator.statistics().stale
        server.hang = True
        now[0] += 20 * 60  # the cached keys are due for a refresh; the provider hangs
        logins = [validator.validate(token) for _ in range(20)]
        # every login is checked with the cached keys well within a handshake's time
        results = await asyncio.wait_for(asyncio.gather(*logins), timeout=5)
        assert {claims.tenant_id for claims in results} == {"acme"}
        assert server.requests == 2  # one refresh in flight for all of them
        assert validator.statistics().stale
        assert validator.statistics().loaded
        # the refresh has an overall deadline: it fails, is counted, the keys stay
        await until(lambda: validator.statistics().refresh_failures > 0)
        assert "no answer within 2s" in validator.statistics().problem
        assert (await validator.validate(token)).tenant_id == "acme"
        # the provider answers again: after the cooldown the keys are fresh
        server.hang = False
        server.release.set()
        now[0] += 31
        await validator.validate(token)
        async with asyncio.timeout(10):
            while validator.statistics().stale:
                await validator.validate(token)
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_without_cached_keys_a_hung_fetch_fails_by_its_deadline(key: Key, serve_jwks: Any) -> None:
    server = serve_jwks(key)
    server.hang = True
    validator = JwtValidator(settings_for(jwks_url=server.url, jwks_fetch_timeout="500ms"))
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"no answer within 0\.5s"):
        validate(validator, key.sign(claims()))
    assert time.monotonic() - started < 5


# ---- fuzzing the parser of untrusted tokens --------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=30,
)


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@given(JSON)
def test_the_nesting_scan_agrees_with_the_json_structure(value: object) -> None:
    assert _json_depth(json.dumps(value).encode()) == depth_of(value)


@settings(max_examples=300, deadline=None)
@given(
    header=JSON | st.text(max_size=50),
    body=JSON | st.text(max_size=50),
    signature=st.binary(max_size=64),
)
def test_any_token_gets_a_classified_answer(
    key: Key,
    tmp_path_factory: pytest.TempPathFactory,
    header: object,
    body: object,
    signature: bytes,
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "key.pem"
    path.write_bytes(key.pem())
    validator = JwtValidator(settings_for(public_key_file=str(path)))
    segments = [b64(json.dumps(part).encode()) for part in (header, body)]
    token = ".".join([*segments, b64(signature)])
    with contextlib.suppress(InvalidToken, TokenExpired):  # anything else fails the test
        validate(validator, token)
