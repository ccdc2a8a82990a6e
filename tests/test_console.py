"""The relay's web console, driven in a real headless Chromium (Debian's ``chromium``, through
playwright's ``executable_path``: no browser is downloaded) against a real relay with real
clients on loopback. Each page's screenshot is written under the test's temp dir (its path
is printed) for a person to look at; docs/console.md shows them."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from browser import chromium
from cli_process import BIN, NO_KEYRING, environment, start, stop
from jsonschema import Draft202012Validator
from loopback import free_port
from playwright import sync_api

pytestmark = pytest.mark.timeout(180)

ENV = environment(CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc", **NO_KEYRING)
#: a hang guard for what the console shows after a change (live updates every 2 s)
SHOWN_WITHIN_MS = 30_000
DEVICE = ("relay:connect", "tunnel:create", "p2p:mesh")
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "console"


@dataclass
class ConsoleBed:
    home: Path
    ports: dict[str, int]
    url: str
    shots: Path
    devices: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.home / "relay"

    def cloudbridge(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "cloudbridge", *args],
            capture_output=True,
            text=True,
            env=ENV,
            check=False,
            timeout=60,
        )

    def token(self, tenant: str, subject: str, *permissions: str) -> str:
        issued = self.cloudbridge(
            *("relay", "token", "issue", "--state-dir", self.state),
            *("--tenant", tenant, "--subject", subject),
            *(arg for permission in permissions for arg in ("--permission", permission)),
        )
        assert issued.returncode == 0, issued.stderr
        return issued.stdout.strip()

    def device_config(self, name: str, token: str) -> Path:
        document = {
            "relay": {"host": "127.0.0.1", "tls": {"ca_file": str(self.state / "ca.pem")}},
            "auth": {"token": token},
            "transport": {n: {"port": self.ports[n]} for n in ("tls", "websocket")},
            "metrics": {"enabled": False},
            "p2p": {"name": name},
        }
        path = self.home / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    def start_device(self, config: Path, **env: str) -> subprocess.Popen[str]:
        process = start("p2p", "--config", str(config), env={**ENV, **env}, ready="in the mesh as")
        self.devices.append(process)
        return process

    def api(self, path: str, token: str | None) -> tuple[int, Any]:
        """``GET /api/v1{path}`` with ``token`` as its bearer: the status and the JSON."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        connection = http.client.HTTPConnection("127.0.0.1", self.ports["console"], timeout=10)
        try:
            connection.request("GET", f"/api/v1{path}", headers=headers)
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleBed]:
    home = tmp_path_factory.mktemp("console")
    ports = {name: free_port() for name in ("tls", "websocket", "stun", "console")}
    config = home / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "listen": "127.0.0.1",
                    "public_host": "127.0.0.1",
                    "stun_port": ports["stun"],
                    "console": {"port": ports["console"]},
                },
                "transport": {n: {"port": ports[n]} for n in ("tls", "websocket")},
                "metrics": {"enabled": False},
            }
        )
    )
    relay = start(
        *("relay", "serve", "--dev", "--config", str(config), "--state-dir", str(home / "relay")),
        env=ENV,
        ready="client config:",
    )
    shots = tmp_path_factory.mktemp("console-screenshots")
    print(f"console screenshots: {shots}")
    bed = ConsoleBed(home, ports, f"http://127.0.0.1:{ports['console']}/", shots)
    try:
        for name in ("laptop", "server"):
            bed.start_device(bed.device_config(name, bed.token("acme", name, *DEVICE)))
        yield bed
    finally:
        for device in bed.devices:
            if device.poll() is None:
                stop(device)
            elif device.stderr is not None:  # one that ended (revoked) leaves its pipe
                device.stderr.close()
        assert stop(relay) == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def log_in(browser: Any, bed: ConsoleBed, token: str, *, javascript: bool = True) -> Any:
    page = browser.new_page(viewport={"width": 1200, "height": 900}, java_script_enabled=javascript)
    page.goto(bed.url + "console/")
    assert page.url.endswith("/console/login")  # nothing shown before a login
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/console/")
    return page


def test_log_in_see_devices_invite_one_watch_it_join_then_revoke_it(
    bed: ConsoleBed, browser: Any
) -> None:
    expect = sync_api.expect
    login = browser.new_page(viewport={"width": 1200, "height": 900})
    login.goto(bed.url)
    expect(login.get_by_role("heading", name="Log in")).to_be_visible()
    login.screenshot(path=bed.shots / "login.png")
    login.close()

    page = log_in(browser, bed, bed.token("acme", "alice", "relay:admin"))
    cookie = next(c for c in page.context.cookies() if c["name"] == "cloudbridge_console")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain HTTP on loopback; HTTPS makes it Secure (docs)
    expect(page.locator("#device-count")).to_have_text("2")
    expect(page.locator("#tenant")).to_have_text("acme")

    page.get_by_role("link", name="Devices").click()
    table = page.locator("#device-table")
    for name in ("laptop", "server"):
        expect(table.get_by_role("row", name=name)).to_be_visible()
    # each device reports a path to the other (direct on loopback; any path will do)
    for name in ("laptop", "server"):
        expect(table.get_by_role("row", name=name).locator("td.paths")).not_to_have_text(
            "none", timeout=SHOWN_WITHIN_MS
        )
    expect(page.locator("svg.graph .edge")).to_have_count(1, timeout=SHOWN_WITHIN_MS)
    page.screenshot(path=bed.shots / "devices.png", full_page=True)

    page.get_by_role("link", name="laptop").click()
    expect(page.get_by_role("heading", name="Device laptop")).to_be_visible()
    expect(page.get_by_role("heading", name="To server:")).to_be_visible()
    shows_the_candidate_pair_that_worked(bed, page)
    page.screenshot(path=bed.shots / "device.png", full_page=True)

    page.get_by_role("link", name="Overview").click()
    page.screenshot(path=bed.shots / "overview.png", full_page=True)

    page.get_by_role("link", name="Invites").click()
    page.get_by_label("Valid for").fill("1h")
    page.get_by_label("Uses").fill("1")
    page.get_by_role("button", name="Create invite").click()
    url = page.get_by_label("Invite URL").input_value()
    assert url.startswith(f"cloudbridge://127.0.0.1:{bed.ports['tls']}/join?")
    expect(page.locator(".qr svg")).to_be_visible()
    page.screenshot(path=bed.shots / "invites.png", full_page=True)

    # the devices page stays open: the new device must appear without a reload
    page.get_by_role("link", name="Devices").click()
    rows = page.locator("#device-table tbody tr")
    expect(rows).to_have_count(2)
    joined = bed.cloudbridge(
        *("join", url, "--no-start", "--config-dir", bed.home / "phone", "--insecure-storage")
    )
    assert joined.returncode == 0, joined.stderr
    phone = bed.start_device(bed.home / "phone" / "config.yaml", CLOUDBRIDGE_P2P__NAME="phone")
    expect(rows).to_have_count(3, timeout=SHOWN_WITHIN_MS)
    expect(page.locator("#device-table").get_by_role("row", name="phone")).to_be_visible()

    page.get_by_role("link", name="phone").click()
    page.get_by_role("button", name="Revoke this device's access").click()
    expect(page.locator("#revoked")).to_contain_text("every token of invited-")
    page.screenshot(path=bed.shots / "tokens.png", full_page=True)
    assert phone.wait(timeout=30) == 4  # the session ended: invalid_token, the exit code 4
    page.get_by_role("link", name="Devices").click()
    expect(rows).to_have_count(2, timeout=SHOWN_WITHIN_MS)
    page.close()


def shows_the_candidate_pair_that_worked(bed: ConsoleBed, page: Any) -> None:
    """The device ``page`` shows its ICE candidate pairs as its API document has them (the
    devices run ICE on this host), the one that succeeded among them."""
    succeeded = page.get_by_role("listitem").filter(has_text=re.compile(r" → .+: succeeded$"))
    sync_api.expect(succeeded.first).to_be_visible(timeout=SHOWN_WITHIN_MS)
    admin = bed.token("acme", "alice", "relay:admin")
    status, device = bed.api("/devices/" + page.url.rsplit("/", 1)[1], admin)
    assert status == 200
    Draft202012Validator(console_schema("device")).validate(device)
    (peer,) = device["peers"]
    reported = {
        f"{pair['local']} → {pair['remote']}: {pair['state']}"
        for attempt in peer["attempts"]
        for pair in attempt["candidate_pairs"]
    }
    assert succeeded.first.inner_text() in reported, reported


def test_a_wrong_or_missing_token_sees_nothing(bed: ConsoleBed, browser: Any) -> None:
    expect = sync_api.expect
    page = browser.new_page()
    for token in ("not-a-token", bed.token("acme", "bob", *DEVICE)):  # garbage; no relay:admin
        page.goto(bed.url + "console/login")
        page.get_by_label("Admin token").fill(token)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#login-error")).to_be_visible()
        assert "laptop" not in page.content()
        page.goto(bed.url + "console/devices")
        assert page.url.endswith("/console/login")
    page.close()
    for token in (None, "not-a-token", bed.token("acme", "bob", *DEVICE)):
        for path in ("/overview", "/devices", "/invites", "/tokens"):
            status, body = bed.api(path, token)
            assert status == 401, (path, body)
            assert set(body) == {"error", "message"}, body


def test_a_tenant_admin_never_sees_another_tenant(bed: ConsoleBed, browser: Any) -> None:
    acme_admin = bed.token("acme", "alice", "relay:admin")
    beta_admin = bed.token("beta", "carol", "relay:admin")
    status, acme = bed.api("/devices", acme_admin)
    assert status == 200
    Draft202012Validator(console_schema("devices")).validate(acme)
    assert {d["name"] for d in acme["devices"]} >= {"laptop", "server"}
    status, beta = bed.api("/devices", beta_admin)
    assert (status, beta["tenant_id"], beta["devices"], beta["links"]) == (200, "beta", [], [])
    laptop = next(d["peer_id"] for d in acme["devices"] if d["name"] == "laptop")
    assert bed.api(f"/devices/{laptop}", beta_admin)[0] == 404
    status, tokens = bed.api("/tokens", beta_admin)
    assert tokens["in_use"] == [], tokens
    Draft202012Validator(console_schema("tokens")).validate(tokens)
    status, overview = bed.api("/overview", beta_admin)
    Draft202012Validator(console_schema("overview")).validate(overview)
    assert overview["devices"] == 0

    page = log_in(browser, bed, beta_admin)
    page.goto(bed.url + "console/devices")
    sync_api.expect(page.locator("#device-table tbody tr")).to_have_count(0)
    assert "laptop" not in page.content()
    page.goto(bed.url + f"console/devices/{laptop}")
    assert "laptop" not in page.content()
    page.close()


def test_the_pages_read_and_change_without_javascript(bed: ConsoleBed, browser: Any) -> None:
    expect = sync_api.expect
    page = log_in(browser, bed, bed.token("acme", "alice", "relay:admin"), javascript=False)
    expect(page.locator("#device-count")).to_have_text("2")
    page.get_by_role("link", name="Devices").click()
    for name in ("laptop", "server"):
        expect(page.locator("#device-table").get_by_role("row", name=name)).to_be_visible()
    page.get_by_role("link", name="Invites").click()
    page.get_by_role("button", name="Create invite").click()
    expect(page.get_by_label("Invite URL")).to_have_value(re.compile("^cloudbridge://"))
    created = page.locator(".created").inner_text()
    invite_id = re.search(r"Id ([0-9a-f]{12})", created)
    assert invite_id is not None, created
    row = page.locator(f"tr[data-invite='{invite_id[1]}']")
    expect(row).to_have_count(1)
    page.get_by_role("button", name=f"Revoke invite {invite_id[1]}").click()
    expect(row).to_have_count(0)
    page.keyboard.press("Tab")  # the first stop skips the navigation
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/console/login")
    page.goto(bed.url + "console/devices")
    assert page.url.endswith("/console/login")  # the login is gone with its cookie
    page.close()


def test_every_change_needs_the_logins_csrf_token(bed: ConsoleBed, browser: Any) -> None:
    page = log_in(browser, bed, bed.token("acme", "alice", "relay:admin"))
    page.goto(bed.url + "console/invites")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    forged = page.request.post(bed.url + "console/invites", form={"ttl": "1h", "uses": "1"})
    assert forged.status == 403
    wrong = page.request.post(
        bed.url + "console/invites", form={"ttl": "1h", "uses": "1", "csrf": "x" * 43}
    )
    assert wrong.status == 403
    api = page.request.post(bed.url + "api/v1/invites", data={"ttl": "1h"})
    assert api.status == 403
    made = page.request.post(
        bed.url + "api/v1/invites", data={"ttl": "1h"}, headers={"X-CSRF-Token": csrf}
    )
    assert made.status == 201, made.text()
    Draft202012Validator(console_schema("invite-created")).validate(made.json())
    bad = page.request.post(
        bed.url + "console/invites", form={"ttl": "forever", "uses": "1", "csrf": csrf}
    )
    assert bad.status == 400
    assert "ttl: &#39;forever&#39; is not a duration" in bad.text()
    page.close()


def test_off_loopback_the_console_needs_tls_and_then_its_cookie_is_secure(
    bed: ConsoleBed, browser: Any, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("tls", "websocket", "stun", "console")}
    console = {"port": ports["console"], "host": "0.0.0.0"}  # noqa: S104 - refused without TLS

    def relay_config(**tls: str) -> Path:
        path = tmp_path / "relay.yaml"
        server = {"listen": "127.0.0.1", "stun_port": ports["stun"], "console": {**console, **tls}}
        path.write_text(
            yaml.safe_dump(
                {
                    "server": server,
                    "transport": {n: {"port": ports[n]} for n in ("tls", "websocket")},
                    "metrics": {"enabled": False},
                }
            )
        )
        return path

    state = tmp_path / "state"  # a relay of its own: the refused start makes its CA
    serve = ("relay", "serve", "--dev", "--state-dir", str(state), "--config")
    refused = bed.cloudbridge(*serve, relay_config())
    assert refused.returncode != 0
    assert "server.console.tls_cert_file" in refused.stderr
    assert "Traceback" not in refused.stderr
    # the relay's own certificate, signed by its CA, names 127.0.0.1
    secure = relay_config(
        tls_cert_file=str(state / "server.pem"), tls_key_file=str(state / "server.key")
    )
    relay = start(*serve, str(secure), env=ENV, ready="client config:")
    try:
        context = browser.new_context(ignore_https_errors=True)  # the relay's CA, not the OS's
        page = context.new_page()
        page.goto(f"https://127.0.0.1:{ports['console']}/console/login")
        issued = bed.cloudbridge(
            *("relay", "token", "issue", "--state-dir", state, "--tenant", "acme"),
            *("--subject", "alice", "--permission", "relay:admin"),
        )
        page.get_by_label("Admin token").fill(issued.stdout.strip())
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/console/")
        (cookie,) = context.cookies()
        assert cookie["name"] == "__Host-cloudbridge_console"
        assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
        sync_api.expect(page.locator("#tenant")).to_have_text("acme")
        context.close()
    finally:
        assert stop(relay) == 0


def console_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return schema
