"""Getting a machine onto the mesh: invites and join, where the token is kept (a real
Secret Service run headless), and the token flags."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest
import yaml
from cli_process import BIN, echo_once, environment, start, stop
from loopback import free_port
from secret_service import secret_service

pytestmark = pytest.mark.timeout(120)

#: a token in the shape of a JWT (init refuses anything else), signed by nobody
JWT_SHAPED = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"

#: the keyring library's own "no backend" (a headless server without a Secret Service)
NO_KEYRING = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


@dataclass
class InvitingRelay:
    state: Path
    ports: dict[str, int]
    env: dict[str, str]

    def cloudbridge(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "cloudbridge", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            input=stdin,
            check=False,
        )

    def invite(self, *extra: str) -> str:
        created = self.cloudbridge(
            "relay", "invite", "create", "--state-dir", str(self.state), "--tenant", "acme", *extra
        )
        assert created.returncode == 0, created.stderr
        (url,) = created.stdout.splitlines()  # the URL alone on stdout
        return url


@contextlib.contextmanager
def inviting_relay(tmp_path: Path) -> Iterator[InvitingRelay]:
    state = tmp_path / "D"
    ports = {name: free_port() for name in ("websocket", "tls")}
    env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_SERVER__PUBLIC_HOST="127.0.0.1",
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc",
        CLOUDBRIDGE_METRICS__ENABLED="false",
        **{f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT": str(p) for name, p in ports.items()},
    )
    relay = start(
        "relay", "serve", "--dev", "--state-dir", str(state), env=env, ready="client config:"
    )
    try:
        yield InvitingRelay(state, ports, env)
    finally:
        assert stop(relay) == 0


def test_invite_then_join_writes_a_working_config_once(tmp_path: Path, echo_port: int) -> None:
    with inviting_relay(tmp_path) as relay:
        url = relay.invite("--ttl", "1h", "--uses", "1")
        assert url.startswith(f"cloudbridge://127.0.0.1:{relay.ports['tls']}/join?")
        (code,) = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["code"]
        assert "." not in code  # a one-time code, not a JWT
        assert len(code) <= 64

        # no keyring backend: fail closed, and the invite is not spent
        refused = relay.cloudbridge(
            "join", url, "--no-start", "--config-dir", str(tmp_path / "K"), env=NO_KEYRING
        )
        assert refused.returncode == 4, refused.stderr
        assert "--insecure-storage" in refused.stderr
        assert not (tmp_path / "K").exists()

        joined_dir = tmp_path / "J"
        joined = relay.cloudbridge(
            "join", url, "--no-start", "--config-dir", str(joined_dir), "--insecure-storage"
        )
        assert joined.returncode == 0, joined.stderr
        config = joined_dir / "config.yaml"
        written = yaml.safe_load(config.read_text())
        assert written["transport"] == {name: {"port": p} for name, p in relay.ports.items()}
        assert (joined_dir / "token").stat().st_mode & 0o777 == 0o600
        assert "eyJ" not in config.read_text()  # the token is not in the config
        assert relay.cloudbridge("config", "validate", str(config)).returncode == 0

        again = relay.cloudbridge(
            "join", url, "--no-start", "--config-dir", str(tmp_path / "J2"), "--insecure-storage"
        )
        assert again.returncode == 4
        assert "unknown invite" in again.stderr
        assert not (tmp_path / "J2").exists()

        expired = relay.invite("--ttl", "1s")
        time.sleep(1.5)
        late = relay.cloudbridge(
            "join",
            expired,
            "--no-start",
            "--config-dir",
            str(tmp_path / "J3"),
            "--insecure-storage",
        )
        assert late.returncode == 4
        assert "expired" in late.stderr
        forged = url.replace("code=", "code=x")
        assert relay.cloudbridge("join", forged, "--no-start", "--insecure-storage").returncode == 4
        assert relay.cloudbridge("join", "https://example.com/", "--no-start").returncode == 2

        assert_the_config_runs_a_tunnel_under_systemd(config, tmp_path, echo_port)


def assert_the_config_runs_a_tunnel_under_systemd(
    config: Path, tmp_path: Path, echo_port: int
) -> None:
    """The tunnel tells systemd (Type=notify) when it is ready and when it stops."""
    local = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))  # as systemd does for Type=notify
        systemd.settimeout(10)
        tunnel = start(
            *("tunnel", "--config", str(config), "--local-port", str(local)),
            *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
            env=environment(
                CLOUDBRIDGE_METRICS__ENABLED="false", NOTIFY_SOCKET=str(tmp_path / "notify")
            ),
            ready="tunnel 127.0.0.1:",
        )
        try:
            assert systemd.recv(100) == b"READY=1"
            assert echo_once(local, b"joined by invite") == b"joined by invite"
        finally:
            assert stop(tunnel) == 0
        assert systemd.recv(100) == b"STOPPING=1"


def kept_in_secret_service(keyring_env: dict[str, str]) -> str:
    """The relay's token as the Secret Service holds it, read by libsecret's own tool."""
    kept = subprocess.run(
        ["secret-tool", "lookup", "service", "cloudbridge", "username", "127.0.0.1"],
        capture_output=True,
        text=True,
        env={**environment(), **keyring_env},
        check=False,
    )
    assert kept.returncode == 0
    return kept.stdout.strip()


def test_join_keeps_the_token_in_a_real_secret_service(tmp_path: Path, echo_port: int) -> None:
    with (
        inviting_relay(tmp_path) as relay,
        secret_service(tmp_path / "home") as keyring_env,
    ):
        joined = relay.cloudbridge(
            *("join", relay.invite(), "--no-start", "--config-dir", str(tmp_path / "J")),
            env=keyring_env,
        )
        assert joined.returncode == 0, joined.stderr
        config = tmp_path / "J" / "config.yaml"
        assert yaml.safe_load(config.read_text())["auth"]["token_storage"] == "keyring"
        assert not (tmp_path / "J" / "token").exists()
        token = kept_in_secret_service(keyring_env)
        assert token.count(".") == 2  # the relay's JWT, in the Secret Service

        health = relay.cloudbridge(
            "health", "--config", str(config), "--format", "json", env=keyring_env
        )
        assert health.returncode == 0, health.stderr
        source = json.loads(health.stdout)["details"]["authentication"]["token_source"]
        assert source == "keyring SecretService Keyring (service 'cloudbridge')"

        local = free_port()
        tunnel = start(
            *("tunnel", "--config", str(config), "--local-port", str(local)),
            *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
            env={**relay.env, **keyring_env},
            ready="tunnel 127.0.0.1:",
        )
        try:
            assert echo_once(local, b"from the keyring") == b"from the keyring"
            status = relay.cloudbridge("status", "--config", str(config), "--json", env=keyring_env)
            assert json.loads(status.stdout)["relay"]["token_source"] == source
        finally:
            assert stop(tunnel) == 0

        # the keyring gone: the client fails closed and says where it looked
        without = relay.cloudbridge(
            "health", "--config", str(config), "--format", "json", env=NO_KEYRING
        )
        assert without.returncode == 4  # auth required (docs/errors.md)
        reason = json.loads(without.stdout)["reasons"][0]
        assert reason.startswith("no token: none is kept in the OS keyring")
        assert token not in without.stdout + without.stderr


def test_token_flags_and_environment(tmp_path: Path) -> None:
    with (
        inviting_relay(tmp_path) as relay,
        secret_service(tmp_path / "home") as keyring_env,
    ):
        config = tmp_path / "J" / "config.yaml"
        joined = relay.cloudbridge(
            *("join", relay.invite(), "--no-start", "--config-dir", str(config.parent)),
            env=keyring_env,
        )
        assert joined.returncode == 0, joined.stderr
        token = kept_in_secret_service(keyring_env)
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)

        def health(*flags: str, env: dict[str, str], stdin: str | None = None) -> str:
            """Where the healthy client found its token; no keyring backend unless given."""
            checked = relay.cloudbridge(
                *flags, "health", "--config", str(config), "--format", "json", env=env, stdin=stdin
            )
            assert checked.returncode == 0, checked.stderr
            assert token not in checked.stdout + checked.stderr.replace(f"--token {token}", "")
            source: str = json.loads(checked.stdout)["details"]["authentication"]["token_source"]
            return source

        assert health("--token-file", str(token_file), env=NO_KEYRING) == "flag --token-file"
        assert health("--token-stdin", env=NO_KEYRING, stdin=token + "\n") == "flag --token-stdin"
        assert health(env={**NO_KEYRING, "CLOUDBRIDGE_TOKEN": token}) == "env CLOUDBRIDGE_TOKEN"
        # a flag beats the keyring
        assert health("--token-file", str(token_file), env=keyring_env) == "flag --token-file"

        visible = relay.cloudbridge(
            "--token", token, "health", "--config", str(config), "--format", "json", env=NO_KEYRING
        )
        assert visible.returncode == 0
        assert "warning: a token on the command line is visible" in visible.stderr
        assert json.loads(visible.stdout)["details"]["authentication"]["token_source"] == (
            "flag --token"
        )

        both = relay.cloudbridge(
            "--token-file", str(token_file), "--token-stdin", "health", "--config", str(config)
        )
        assert both.returncode == 2
        assert "--token-file and --token-stdin both give the token" in both.stderr
        (tmp_path / "empty").write_text("\n")
        empty = relay.cloudbridge("--token-file", str(tmp_path / "empty"), "health")
        assert empty.returncode == 2
        assert "--token-file" in empty.stderr
        assert "the token is empty" in empty.stderr


def issue_token(relay: InvitingRelay) -> str:
    issued = relay.cloudbridge(
        *("relay", "token", "issue", "--state-dir", str(relay.state)),
        *("--tenant", "acme", "--subject", "laptop", "--permission", "relay:connect"),
    )
    assert issued.returncode == 0, issued.stderr
    return issued.stdout.strip()


def run_wizard(relay: InvitingRelay, config_dir: Path, token: str) -> None:
    """Answer cloudbridge init's prompts on a pseudo-terminal, a wrong answer first each time."""
    transcript = io.StringIO()
    wizard = pexpect.spawn(
        str(BIN / "cloudbridge"),
        ["init", "--config-dir", str(config_dir)],
        env={**relay.env, **NO_KEYRING},
        encoding="utf-8",
        timeout=30,
    )
    wizard.logfile_read = transcript

    def answer(prompt: str, text: str, *, wrong: str = "", error: str = "") -> None:
        wizard.expect_exact(prompt)
        if wrong:
            wizard.sendline(wrong)
            wizard.expect_exact(error)
            wizard.expect_exact(prompt)  # asked again
        wizard.sendline(text)

    answer(
        "Relay host: ",
        "127.0.0.1",
        wrong="https://127.0.0.1/",
        error="is not a host name or address",
    )
    answer("Transport (auto, ", "tls", wrong="carrier-pigeon", error="is not one of auto, ")
    answer("tls port [5556]: ", str(relay.ports["tls"]), wrong="99999", error="is not a port")
    answer(
        "CA certificate of the relay (PEM file, or 'system') [system]: ",
        str(relay.state / "ca.pem"),
        wrong="/nonexistent",
        error="cannot read /nonexistent",
    )
    answer("Authentication (", "jwt", wrong="kerberos", error="is not one of")
    answer("Token (input hidden", token)
    answer("No OS keyring is available here. Keep the token in a 0600 file instead?", "y")
    answer("Serve Prometheus metrics? [Y/n]: ", "y")
    answer("Metrics port [9464]: ", str(free_port()))
    answer("Install the system service now? [y/N]: ", "n")
    wizard.expect_exact("next: cloudbridge p2p --config")
    wizard.expect(pexpect.EOF)
    wizard.close()
    assert wizard.exitstatus == 0, transcript.getvalue()
    assert token not in transcript.getvalue()  # typed, never echoed


def test_init_asks_checks_each_answer_and_writes_a_config_that_works(tmp_path: Path) -> None:
    with inviting_relay(tmp_path) as relay:
        token = issue_token(relay)
        config_dir = tmp_path / "C"
        run_wizard(relay, config_dir, token)

        config = config_dir / "config.yaml"
        assert relay.cloudbridge("config", "validate", str(config)).returncode == 0
        written = yaml.safe_load(config.read_text())
        assert written["transport"] == {"mode": "tls", "tls": {"port": relay.ports["tls"]}}
        assert written["auth"]["token_storage"] == "file"
        assert (config_dir / "token").stat().st_mode & 0o777 == 0o600
        health = relay.cloudbridge("health", "--config", str(config), "--format", "json")
        assert health.returncode == 0, health.stdout
        source = json.loads(health.stdout)["details"]["authentication"]["token_source"]
        assert source == f"file {config_dir / 'token'}"

        # --reauth: only authentication changes
        new_token = issue_token(relay)
        redone = relay.cloudbridge(
            *("init", "--config-dir", str(config_dir), "--reauth", "--non-interactive"),
            *("--auth", "jwt", "--token-stdin", "--insecure-storage"),
            stdin=new_token + "\n",
        )
        assert redone.returncode == 0, redone.stderr
        rewritten = yaml.safe_load(config.read_text())
        assert {k: v for k, v in rewritten.items() if k != "auth"} == {
            k: v for k, v in written.items() if k != "auth"
        }
        assert (config_dir / "token").read_text() == new_token
        assert relay.cloudbridge("health", "--config", str(config)).returncode == 0
        again = relay.cloudbridge("init", "--config-dir", str(config_dir), "--non-interactive")
        assert again.returncode == 2
        assert "exists already" in again.stderr


def test_init_without_a_terminal_takes_flags_and_names_a_bad_one(tmp_path: Path) -> None:
    fresh = tmp_path / "N"

    def init(*flags: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "cloudbridge", "init", "--config-dir", str(fresh), *flags],
            capture_output=True,
            text=True,
            env={**environment(), **NO_KEYRING},
            input=stdin,
            check=False,
        )

    missing = init("--non-interactive")
    assert missing.returncode == 2
    assert "--relay-host is required with --non-interactive" in missing.stderr
    bad_port = init(
        "--non-interactive", "--relay-host", "relay.test", "--transport", "tls", "--relay-port", "0"
    )
    assert bad_port.returncode == 2
    assert "--relay-port" in bad_port.stderr
    assert "'0' is not a port" in bad_port.stderr
    no_token = init("--non-interactive", "--relay-host", "relay.test", "--token-stdin")
    assert no_token.returncode == 2
    assert "--token-stdin" in no_token.stderr
    no_keyring = init(
        "--non-interactive", "--relay-host", "relay.test", "--token-stdin", stdin=JWT_SHAPED + "\n"
    )
    assert no_keyring.returncode == 4
    assert "--insecure-storage" in no_keyring.stderr
    no_terminal = init()
    assert no_terminal.returncode == 2
    assert "--non-interactive" in no_terminal.stderr
    assert not fresh.exists()
    env_token = init("--non-interactive", "--relay-host", "relay.test", "--no-metrics")
    assert env_token.returncode == 0, env_token.stderr
    written = yaml.safe_load((fresh / "config.yaml").read_text())
    assert written == {
        "relay": {"host": "relay.test"},
        "transport": {"mode": "auto"},
        "auth": {"type": "jwt"},  # the token comes from CLOUDBRIDGE_TOKEN when running
        "metrics": {"enabled": False},
    }
    (fresh / "config.yaml").write_text("relay:\n  port: 1\n")
    no_relay = init("--reauth", "--non-interactive", "--auth", "jwt")
    assert no_relay.returncode == 2
    assert "names no relay.host" in no_relay.stderr
