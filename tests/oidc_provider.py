"""A real OpenID Provider on loopback: npm oidc-provider running
plugins/cloudbridge-oidc/tests/provider/server.mjs with keys the test chooses."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx2
from joserfc import jwt
from joserfc.jwk import RSAKey
from loopback import free_port

PROVIDER_DIR = Path(__file__).parents[1] / "plugins" / "cloudbridge-oidc" / "tests" / "provider"
MACHINE_SECRET = "test-only-machine-secret"
AUDIENCE = "cloudbridge-relay"


def new_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})


class OpenIdProvider:
    """oidc-provider with keys this test chose; ``rotate`` restarts it with others."""

    def __init__(self, directory: Path, **env: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.keys: list[RSAKey] = []
        self._process: subprocess.Popen[str] | None = None

    def start(self, *keys: RSAKey) -> None:
        self.keys = list(keys)
        keys_file = self.directory / "provider-keys.json"
        keys_file.write_text(json.dumps({"keys": [k.as_dict(private=True) for k in keys]}))
        self._process = subprocess.Popen(
            ["node", "server.mjs"],
            cwd=PROVIDER_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={
                **os.environ,
                **self.env,
                "PORT": str(self.port),
                "KEYS_FILE": str(keys_file),
                "MACHINE_SECRET": MACHINE_SECRET,
            },
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        assert line.startswith("READY"), f"oidc-provider did not start: {line!r}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.communicate(timeout=10)
            self._process = None

    def rotate(self, *keys: RSAKey) -> None:
        self.stop()
        self.start(*keys)

    def events(self, kind: str) -> list[float]:
        answered = httpx2.get(f"{self.issuer}/test/events").json()
        return [e["at"] for e in answered if e["event"] == kind]

    def machine_token(self) -> str:
        """An access token for the machine client, by client credentials."""
        answered = httpx2.post(
            f"{self.issuer}/token",
            data={"grant_type": "client_credentials"},
            auth=("cloudbridge-machine", MACHINE_SECRET),
        )
        assert answered.status_code == 200, answered.text
        token: str = answered.json()["access_token"]
        return token

    def sign(self, key: RSAKey, **claims: Any) -> str:
        """A token signed with ``key`` as this provider would (for expired tokens)."""
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
            "custom:tenant_id": "acme",
            "custom:permissions": ["tunnel:create"],
            **claims,
        }
        return jwt.encode({"alg": "RS256", "kid": key.kid}, body, key)

    def act_as_user(self, address: str, *, login: str = "alice", abort: bool = False) -> str:
        """Open ``address`` in a cookie-keeping browser and submit each form on the way, as a
        person would (confirm the code, log in, consent); returns the final page's text."""
        browser = httpx2.Client(follow_redirects=True, timeout=15)
        page = browser.get(address)
        for _ in range(8):
            form = re.search(r'<form[^>]*action="([^"]*)"[^>]*>(.*?)</form>', page.text, re.S)
            if form is None:
                break
            fields: dict[str, str] = {}
            for field in re.finditer(r"<(?:input|button)([^>]*)>", form.group(2)):
                attributes = dict(re.findall(r'(\w+)="([^"]*)"', field.group(1)))
                if "name" in attributes:
                    fields[attributes["name"]] = html.unescape(attributes.get("value", ""))
            if "login" in fields:
                fields.update(login=login, password="any")  # devInteractions takes any password
            if abort and "confirm" in fields:  # the page asking "is this your code?"
                del fields["confirm"]
                fields["abort"] = "yes"
            action = urllib.parse.urljoin(str(page.url), html.unescape(form.group(1)))
            page = browser.post(action, data=fields)
        browser.close()
        return re.sub(r"\s+", " ", re.sub(r"<style.*?</style>|<[^>]+>", " ", page.text, flags=re.S))
