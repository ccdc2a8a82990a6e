"""Logging in to the relay's web console at the OpenID Provider (``auth.oidc.
console_client_id``): a real provider, a real relay, and a person in headless Chromium who
signs in and consents at the provider and lands in the console as an admin of the tenant
the token names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from browser import chromium
from cli_process import environment, start, stop
from loopback import free_port
from oidc_provider import AUDIENCE, OpenIdProvider, new_key
from playwright import sync_api

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, OpenIdProvider]]:
    """A relay trusting a provider that has the console registered: the console's URL."""
    port, tls = free_port(), free_port()
    callback = f"http://127.0.0.1:{port}/console/login/oidc/callback"
    provider = OpenIdProvider(tmp_path, CONSOLE_REDIRECT_URI=callback)
    provider.start(new_key("key-1"))
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": "127.0.0.1", "console": {"port": port}},
                "transport": {"tls": {"port": tls}},
                "auth": {
                    "type": "oidc",
                    "oidc": {
                        "issuer": provider.issuer,
                        "audience": AUDIENCE,
                        "console_client_id": "cloudbridge-console",
                    },
                },
                "metrics": {"enabled": False},
            }
        )
    )
    relay = start(
        *("relay", "serve", "--config", str(config), "--state-dir", str(tmp_path / "relay")),
        env=environment(CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket"),
        ready="client config:",
    )
    try:
        yield f"http://127.0.0.1:{port}/console/", provider
    finally:
        assert stop(relay) == 0
        provider.stop()


def sign_in_at_the_provider(page: Any) -> None:
    """What a person does on oidc-provider's development pages: any login, then consent."""
    page.locator("input[name=login]").fill("alice")
    page.locator("input[name=password]").fill("any")
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()


def test_a_person_logs_in_to_the_console_at_the_provider(
    console: tuple[str, OpenIdProvider],
) -> None:
    url, provider = console
    with chromium() as browser:
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("link", name="Log in with your identity provider").click()
        page.wait_for_url(f"{provider.issuer}/**")
        sign_in_at_the_provider(page)
        page.wait_for_url(url)
        sync_api.expect(page.locator("#tenant")).to_have_text("acme")
        sync_api.expect(page.locator(".who")).to_contain_text("alice")
        cookies = {c["name"]: c for c in page.context.cookies(url)}
        assert cookies["cloudbridge_console"]["httpOnly"]
        assert "cloudbridge_console_login" not in cookies  # the login under way is over

        # a callback this browser did not begin (a forged or replayed one) logs nobody in
        other = browser.new_page()
        other.goto(f"{url}login/oidc/callback?code=stolen&state=made-up")
        sync_api.expect(other.locator("#login-error")).to_contain_text("not begun here")
        other.goto(url)
        assert other.url.endswith("/console/login")
        refused = browser.new_page()
        refused.goto(f"{url}login/oidc/callback?error=access_denied&state=x")
        sync_api.expect(refused.locator("#login-error")).to_contain_text("not begun here")
