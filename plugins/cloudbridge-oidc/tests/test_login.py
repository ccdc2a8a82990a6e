"""`cloudbridge login` end to end: a relay that trusts a real OpenID Provider, a person
approving the device flow in a browser (the test), machines with client credentials, and
the token renewed with its refresh token."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_process import BIN, environment, start, stop
from loopback import free_port
from oidc_provider import AUDIENCE, MACHINE_SECRET, OpenIdProvider, new_key

pytestmark = pytest.mark.timeout(120)


def write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def cloudbridge(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        env=environment(CLOUDBRIDGE_METRICS__ENABLED="false", **env),
        check=False,
    )


def client_config(tmp_path: Path, name: str, port: int, **oidc: str) -> Path:
    return write(
        tmp_path / f"{name}.yaml",
        {
            "relay": {
                "host": "127.0.0.1",
                "tls": {"ca_file": str(tmp_path / "relay" / "ca.pem")},
            },
            "transport": {"tls": {"port": port}},
            "auth": {
                "type": "oidc",
                "token_storage": "file",
                "token_file": str(tmp_path / f"{name}.token"),
                "oidc": oidc,
            },
        },
    )


def login(config: Path, provider: OpenIdProvider, *, abort: bool = False) -> tuple[int, str]:
    """Run `cloudbridge login` and approve (or abort) in the browser what it shows."""
    return approve(["login", "--config", str(config), "--no-browser"], provider, abort=abort)


def approve(
    command: list[str], provider: OpenIdProvider, *, abort: bool = False
) -> tuple[int, str]:
    """Run a command that logs in, and approve (or abort) in the browser what it shows."""
    process = subprocess.Popen(
        [BIN / "cloudbridge", *command],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**environment(), "BROWSER": "true"},  # a browser that opens nothing
    )
    assert process.stderr is not None
    said = ""
    while not (first := process.stderr.readline()).startswith("To log in, open "):
        assert first, f"no login address was shown: {said}"
        said += first
    assert first.startswith("To log in, open "), first
    address = first.removeprefix("To log in, open ").strip()
    assert "user_code=" in address  # verification_uri_complete, as the provider gave it
    code = address.split("user_code=")[1]
    assert process.stderr.readline().strip() == f"and check that it shows the code {code}"
    page = provider.act_as_user(address, abort=abort)
    assert ("Sign-in Success" in page) != abort, page
    rest = process.stderr.read()
    process.stderr.close()
    return process.wait(timeout=30), said + first + rest


@pytest.fixture
def relay_port(tmp_path: Path, provider: OpenIdProvider) -> Any:
    port = free_port()
    relay_config = write(
        tmp_path / "relay.yaml",
        {
            "server": {"listen": "127.0.0.1", "public_host": "127.0.0.1"},
            "transport": {"tls": {"port": port}},
            "auth": {
                "type": "oidc",
                "oidc": {
                    "issuer": provider.issuer,
                    "audience": AUDIENCE,
                    "jwks_refetch_cooldown": "1s",
                },
            },
            "metrics": {"enabled": False},
        },
    )
    relay = start(
        *("relay", "serve", "--config", str(relay_config), "--state-dir", str(tmp_path / "relay")),
        env=environment(),
        ready="client config:",
    )
    yield port
    assert stop(relay) == 0


def test_a_person_logs_in_with_the_device_flow_and_the_token_is_renewed(
    tmp_path: Path, provider: OpenIdProvider, relay_port: int
) -> None:
    provider.env.update(SLOW_DOWN_ONCE="1", ACCESS_TOKEN_TTL="30")
    provider.rotate(*provider.keys)
    config = client_config(tmp_path, "laptop", relay_port, issuer=provider.issuer)

    status, said = login(config, provider)
    assert status == 0, said
    assert f"token kept in the file {tmp_path / 'laptop.token'}" in said
    assert "(renewed with a refresh token)" in said
    polls = provider.events("token")
    assert polls[1] - polls[0] >= 6.0  # slow_down: the interval (1s) grew by 5s
    first_token = (tmp_path / "laptop.token").read_text()
    first_refresh = (tmp_path / "laptop.token.refresh").read_text()

    # the access token has 30s left (< 60s): the client renews it before connecting
    health = cloudbridge("health", "--config", str(config), "--format", "json")
    assert health.returncode == 0, health.stdout + health.stderr
    document = json.loads(health.stdout)
    assert document["details"]["authentication"]["token_source"] == (
        f"file {tmp_path / 'laptop.token'}"
    )
    assert (tmp_path / "laptop.token").read_text() != first_token
    assert (tmp_path / "laptop.token.refresh").read_text() != first_refresh  # rotated
    assert first_token not in health.stdout + health.stderr
    assert_a_service_can_renew_its_copy(config, tmp_path)


def assert_a_service_can_renew_its_copy(config: Path, tmp_path: Path) -> None:
    """A system service cannot reach the user's token store: `service install` copies the
    tokens into the service's state directory and points the service there, so that it
    renews them itself (not a read-only credential, which would expire)."""
    planned = cloudbridge("service", "install", "--dry-run", "--config", str(config))
    assert planned.returncode == 0, planned.stderr
    copy = Path("/var/lib/cloudbridge/cloudbridge-client.token")
    assert f"would write {copy} (0600: a copy of the stored token)" in planned.stderr
    assert f"would write {copy}.refresh (0600: a copy of the stored token)" in planned.stderr
    unit = planned.stdout.splitlines()
    assert not any(line.startswith("LoadCredential=") for line in unit)
    (environment,) = [line for line in unit if line.startswith("Environment=")]
    assert "CLOUDBRIDGE_AUTH__TOKEN_STORAGE=file" in environment.split()
    assert f"CLOUDBRIDGE_AUTH__TOKEN_FILE={copy}" in environment.split()
    # the service's view, with its state directory here: it renews the copy in place
    state = tmp_path / "state"
    state.mkdir()
    for name in ("laptop.token", "laptop.token.refresh"):
        (state / name).write_text((tmp_path / name).read_text())
    before = (state / "laptop.token").read_text()
    as_service = cloudbridge(
        "health",
        "--config",
        str(config),
        CLOUDBRIDGE_AUTH__TOKEN_STORAGE="file",
        CLOUDBRIDGE_AUTH__TOKEN_FILE=str(state / "laptop.token"),
    )
    assert as_service.returncode == 0, as_service.stdout
    assert (state / "laptop.token").read_text() != before


def test_an_aborted_login_keeps_nothing(
    tmp_path: Path, provider: OpenIdProvider, relay_port: int
) -> None:
    config = client_config(tmp_path, "laptop", relay_port, issuer=provider.issuer)
    status, said = login(config, provider, abort=True)
    assert status == 4, said
    assert "the login was denied" in said
    assert not (tmp_path / "laptop.token").exists()
    refused = cloudbridge("health", "--config", str(config), "--format", "json")
    assert refused.returncode == 4  # no token: auth required (docs/errors.md)
    assert "no token" in json.loads(refused.stdout)["reasons"][0]


def test_a_machine_logs_in_with_client_credentials_and_rotation_needs_no_restart(
    tmp_path: Path, provider: OpenIdProvider, relay_port: int
) -> None:
    config = client_config(
        tmp_path,
        "machine",
        relay_port,
        issuer=provider.issuer,
        client_id="cloudbridge-machine",
        client_secret="${MACHINE_SECRET}",
    )
    logged_in = cloudbridge("login", "--config", str(config), MACHINE_SECRET=MACHINE_SECRET)
    assert logged_in.returncode == 0, logged_in.stderr
    assert MACHINE_SECRET not in logged_in.stdout + logged_in.stderr
    healthy = cloudbridge("health", "--config", str(config), MACHINE_SECRET=MACHINE_SECRET)
    assert healthy.returncode == 0, healthy.stdout

    # the provider rotates its key; the running relay picks it up on the new kid
    provider.rotate(new_key("key-2"))
    time.sleep(1.1)  # the relay fetched keys just now: one refetch cooldown
    (tmp_path / "machine.token").unlink()
    again = cloudbridge("login", "--config", str(config), MACHINE_SECRET=MACHINE_SECRET)
    assert again.returncode == 0, again.stderr
    after = cloudbridge("health", "--config", str(config), MACHINE_SECRET=MACHINE_SECRET)
    assert after.returncode == 0, after.stdout

    wrong = cloudbridge("login", "--config", str(config), MACHINE_SECRET="not-the-secret")
    assert wrong.returncode == 4
    assert "does not accept this client" in wrong.stderr
    assert "not-the-secret" not in wrong.stderr


def test_init_writes_an_oidc_config_and_logs_in(
    tmp_path: Path, provider: OpenIdProvider, relay_port: int
) -> None:
    config_dir = tmp_path / "laptop"
    status, said = approve(
        [
            *("init", "--config-dir", str(config_dir), "--non-interactive"),
            *("--relay-host", "127.0.0.1", "--transport", "tls", "--relay-port", str(relay_port)),
            *("--ca-file", str(tmp_path / "relay" / "ca.pem"), "--auth", "oidc"),
            *("--oidc-issuer", provider.issuer, "--insecure-storage", "--no-metrics", "--login"),
        ],
        provider,
    )
    assert status == 0, said
    assert f"wrote {config_dir / 'config.yaml'}" in said
    assert f"token kept in the file {config_dir / 'token'}" in said
    config = config_dir / "config.yaml"
    assert yaml.safe_load(config.read_text())["auth"]["oidc"] == {
        "issuer": provider.issuer,
        "client_id": "cloudbridge-cli",
    }
    assert cloudbridge("health", "--config", str(config)).returncode == 0


def test_a_login_nobody_approves_ends_when_the_code_expires(
    tmp_path: Path, provider: OpenIdProvider, relay_port: int
) -> None:
    provider.env["DEVICE_CODE_TTL"] = "3"
    provider.rotate(*provider.keys)
    config = client_config(tmp_path, "laptop", relay_port, issuer=provider.issuer)
    started = time.monotonic()
    waited = cloudbridge("login", "--config", str(config), "--no-browser")
    assert waited.returncode == 4, waited.stderr
    assert "(the code expires in 3s; waiting for approval...)" in waited.stderr
    assert "the device code expired before the login was approved" in waited.stderr
    assert time.monotonic() - started < 10
    assert not (tmp_path / "laptop.token").exists()


def test_a_relay_without_an_audience_refuses_to_start(
    tmp_path: Path, provider: OpenIdProvider
) -> None:
    config = write(
        tmp_path / "relay.yaml",
        {
            "server": {"listen": "127.0.0.1"},
            "transport": {"tls": {"port": free_port()}},
            "auth": {"type": "oidc", "oidc": {"issuer": provider.issuer}},
            "metrics": {"enabled": False},
        },
    )
    refused = cloudbridge(
        "relay", "serve", "--config", str(config), "--state-dir", str(tmp_path / "relay")
    )
    assert refused.returncode == 3
    assert "auth.oidc: auth.oidc.audience is required on the relay" in refused.stderr


def test_a_client_without_an_issuer_is_told_which_key_is_missing(tmp_path: Path) -> None:
    config = write(
        tmp_path / "laptop.yaml",
        {"relay": {"host": "127.0.0.1"}, "auth": {"type": "oidc", "oidc": {}}},
    )
    tunnel = ("tunnel", "--local-port", "0", "--remote-host", "127.0.0.1", "--remote-port", "1")
    for command in (("health",), ("login",), tunnel):
        refused = cloudbridge(*command, "--config", str(config))
        assert refused.returncode == 3, (command, refused.stderr)
        assert "auth.oidc.issuer is required" in refused.stderr, command
