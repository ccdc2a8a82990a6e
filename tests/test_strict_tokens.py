"""Strict tokens, black box (issue 14): the CLI's lifetime limit, a relay started without an
audience for outside tokens, tenant ids and nested headers over the wire, OIDC checked at
start-up with /readyz waiting for the keys, and logins that keep working while the JWKS
endpoint hangs. The relay keeps serving a bystander throughout."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cli_process import BIN, environment
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import CloudBridgeError, InvalidToken
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.relay.runner import start_relay
from cloudbridge_core.relay.state import RelayState, local_hostnames
from cloudbridge_core.relay.tokens import jwks
from cloudbridge_core.testing.waiting import until
from relaybed import Bed, relay_bed

pytestmark = pytest.mark.timeout(60)


def cloudbridge(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        check=False,
        env=environment(**env),
        timeout=30,
    )


# ---- lifetimes at issue ----------------------------------------------------------------


def test_token_issue_and_invites_refuse_lifetimes_beyond_the_maximum(tmp_path: Path) -> None:
    state = tmp_path / "state"
    RelayState.load_or_create(state, ["localhost"])
    issue = (
        *("relay", "token", "issue", "--state-dir", str(state), "--subject", "laptop"),
        *("--permission", "relay:connect"),
    )
    refused = cloudbridge(*issue, "--tenant", "acme", "--ttl", "36500d")
    assert refused.returncode == 2, refused.stderr
    assert "36500d is longer than the maximum 30d (server.max_token_ttl)" in refused.stderr
    assert refused.stdout == ""
    assert cloudbridge(*issue, "--tenant", "acme", "--ttl", "30d").returncode == 0
    raised = cloudbridge(
        *issue, "--tenant", "acme", "--ttl", "365d", CLOUDBRIDGE_SERVER__MAX_TOKEN_TTL="400d"
    )
    assert raised.returncode == 0, raised.stderr
    # a default lifetime above the maximum is named as what it is
    by_default = cloudbridge(*issue, "--tenant", "acme", CLOUDBRIDGE_SERVER__TOKEN_TTL="60d")
    assert "server.token_ttl: 60d is longer than the maximum 30d" in by_default.stderr
    invite = ("relay", "invite", "create", "--state-dir", str(state), "--tenant", "acme")
    refused = cloudbridge(*invite, "--ttl", "36500d")
    assert refused.returncode == 2
    assert "(server.max_token_ttl)" in refused.stderr
    for tenant in ("*", "../../x", "a" * 4096, "Acme"):
        bad = cloudbridge(*issue, "--tenant", tenant)
        assert bad.returncode == 2
        assert "is not a tenant id" in bad.stderr


def test_a_jwks_url_without_audience_stops_the_relay_at_start(tmp_path: Path) -> None:
    served = cloudbridge(
        *("relay", "serve", "--state-dir", str(tmp_path / "state")),
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_AUTH__JWT__JWKS_URL="https://idp.example.com/jwks.json",
    )
    assert served.returncode == 3, served.stderr
    assert "auth.jwt.audience is required with jwks_url" in served.stderr
    assert "Traceback" not in served.stderr


# ---- the wire --------------------------------------------------------------------------


async def _refused(bed: Bed, token: str) -> CloudBridgeError:
    try:
        connection = await bed.connect(token)
    except CloudBridgeError as error:
        return error
    await connection.aclose()
    pytest.fail("the relay accepted the token")


def test_bad_tenant_ids_and_nested_headers_are_refused_and_counted(tmp_path: Path) -> None:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    async def main() -> None:
        async with relay_bed(tmp_path) as bed:
            bystander = await bed.connect()
            registry = bed.relay.relay.metrics.registry
            for tenant in ("*", "a" * 4096, "acme\x00", "../../x"):
                error = await _refused(bed, bed.token(tenant=tenant))
                assert isinstance(error, InvalidToken), error
                assert "not a tenant id" in error.message
                await bystander.ping(within=5)
            # nested as deep as Python's recursion limit, or larger than any header needs
            for depth, refusal in ((1010, "nests deeper than 16"), (2500, "is larger than")):
                deep = "[" * depth + "]" * depth
                header = b64(('{"alg":"RS256","x":' + deep + "}").encode())
                body = b64(json.dumps({"sub": "x"}).encode())
                error = await _refused(bed, f"{header}.{body}.c2ln")
                assert isinstance(error, InvalidToken)
                assert refusal in error.message
                await bystander.ping(within=5)
            failures = registry.get_sample_value(
                "cloudbridge_relay_auth_failures_total", {"code": "invalid_token"}
            )
            assert failures == 6
            await bystander.aclose()

    asyncio.run(main())


# ---- identity providers on loopback ----------------------------------------------------


class Provider:
    """An OpenID Provider on loopback as far as the relay sees one: discovery and JWKS.
    It can be down (503), hang (accept, never answer) or serve."""

    def __init__(self, keys: dict[str, Any]) -> None:
        self.keys = keys
        self.mode = "serve"
        self.max_age = 3600
        self.requests: list[str] = []
        self.release = threading.Event()
        self.jwks_uri = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                if outer.mode == "hang":
                    outer.release.wait(60)
                    return
                if outer.mode == "down":
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    document: dict[str, Any] = {
                        "issuer": outer.issuer,
                        "jwks_uri": outer.jwks_uri or f"{outer.issuer}/jwks.json",
                        "token_endpoint": f"{outer.issuer}/token",
                    }
                else:
                    document = outer.keys
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"max-age={outer.max_age}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def state(tmp_path: Path) -> RelayState:
    """The relay's state before it starts: the provider serves its signing key."""
    return RelayState.load_or_create(tmp_path / "state", ["127.0.0.1", *local_hostnames()])


@pytest.fixture
def provider(state: RelayState) -> Iterator[Provider]:
    served = Provider(jwks(state.signing_key))
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.release.set()
    served.server.shutdown()
    served.server.server_close()
    thread.join()


@asynccontextmanager
async def auth_bed(tmp_path: Path, **settings: Any) -> AsyncIterator[Bed]:
    """A relay on loopback whose auth section is ``settings`` (by dotted key)."""
    plugins = load_plugins()
    overrides = {
        "server.state_dir": (str(tmp_path / "state"), "test"),
        "server.listen": ("127.0.0.1", "test"),
        **{key: (value, "test") for key, value in settings.items()},
    }
    config = load_config(
        None, environ={}, overrides=overrides, schema=merged_schema(plugins.config_sections())
    )
    running = await start_relay(config, plugins, dev=True, port_override=0)
    try:
        yield Bed(running, plugins, tmp_path / "state")
    finally:
        await running.aclose()


def test_logins_keep_succeeding_while_the_jwks_endpoint_hangs(
    tmp_path: Path, state: RelayState, provider: Provider
) -> None:
    provider.max_age = 1  # the keys are due for a refresh after a second

    async def main() -> None:
        async with auth_bed(
            tmp_path,
            **{
                "auth.jwt.jwks_url": f"{provider.issuer}/jwks.json",
                "auth.jwt.issuer": state.issuer,
                "auth.jwt.audience": "cloudbridge",
                "auth.jwt.jwks_refetch_cooldown": "1s",
                # one refresh stays in flight for the whole test, however slow the host
                "auth.jwt.jwks_fetch_timeout": "60s",
            },
        ) as bed:
            bystander = await bed.connect()
            registry = bed.relay.relay.metrics.registry
            provider.mode = "hang"
            fetched = time.monotonic()
            while time.monotonic() - fetched < 1.5:  # let the cached keys come due
                await bystander.ping(within=5)
                await asyncio.sleep(0.1)
            for _ in range(10):  # each well within a handshake: none waits for the provider
                started = time.monotonic()
                connection = await bed.connect()
                assert time.monotonic() - started < 5  # the provider would hold it for 60s
                await connection.ping(within=5)
                await connection.aclose()
            assert provider.requests.count("/jwks.json") == 2  # one refresh for all ten
            assert registry.get_sample_value("cloudbridge_relay_auth_keys_stale") == 1
            assert registry.get_sample_value("cloudbridge_relay_auth_keys_loaded") == 1
            await bystander.ping(within=5)
            await bystander.aclose()
            provider.release.set()  # the hung fetch ends now, not at its deadline

    asyncio.run(main())


def test_oidc_is_checked_at_start_and_readyz_waits_for_the_keys(
    tmp_path: Path, state: RelayState, provider: Provider
) -> None:
    provider.mode = "down"

    async def main() -> None:
        async with auth_bed(
            tmp_path,
            **{
                "auth.type": "oidc",
                "auth.oidc.issuer": provider.issuer,
                "auth.oidc.audience": "cloudbridge",
            },
        ) as bed:
            readyz = bed.relay.probes()["/readyz"]
            await until(lambda: bool(provider.requests))  # the attempt at start-up fails
            status, _, text = readyz()
            assert status == 503
            assert b"auth keys not loaded" in text
            provider.mode = "serve"
            await until(lambda: readyz()[0] == 200, within=20)  # it tries again by itself
            assert "/jwks.json" in provider.requests  # keys loaded before any login
            token = bed.token(issuer=provider.issuer)
            connection = await bed.connect(token)
            await connection.ping(within=5)
            await connection.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("issuer_suffix", "jwks_uri", "problem"),
    [
        ("/", None, "names issuer"),
        ("", "http://127.0.0.2:9/jwks.json", "is not on the issuer's origin"),
    ],
    ids=["issuer-trailing-slash", "jwks-uri-on-another-host"],
)
def test_oidc_issuer_is_exact_and_keys_come_from_its_origin(
    tmp_path: Path, provider: Provider, issuer_suffix: str, jwks_uri: str | None, problem: str
) -> None:
    if jwks_uri:
        provider.jwks_uri = jwks_uri

    async def main() -> None:
        async with auth_bed(
            tmp_path,
            **{
                "auth.type": "oidc",
                "auth.oidc.issuer": provider.issuer + issuer_suffix,
                "auth.oidc.audience": "cloudbridge",
            },
        ) as bed:
            readyz = bed.relay.probes()["/readyz"]
            await until(lambda: problem.encode() in readyz()[2])
            assert readyz()[0] == 503
            error = await _refused(bed, bed.token(issuer=provider.issuer))
            assert error.code == "unavailable"

    asyncio.run(main())
