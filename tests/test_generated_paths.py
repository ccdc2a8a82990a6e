"""Files CloudBridge writes work from any directory: made from a relative --state-dir or
--config-dir, they are used from / (where a service runs), and a config that names a
missing file is a config error, not a traceback."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli_process import BIN, echo_once, environment, issue_token, start, stop
from loopback import free_port

pytestmark = pytest.mark.timeout(120)

#: where a systemd service runs
ROOT = Path("/")


def cloudbridge(
    *args: str, cwd: Path, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        input=stdin,
        check=False,
    )


@dataclass
class Relay:
    home: Path  # the directory it was started from
    state: Path  # as given to --state-dir: relative to home
    port: int
    env: dict[str, str]

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """A command run where the relay was started, as its operator would."""
        return cloudbridge(*args, cwd=self.home, env=self.env, stdin=stdin)

    def token(self) -> str:
        return issue_token(self.state, cwd=self.home, env=self.env)


@contextlib.contextmanager
def relay_in(home: Path) -> Iterator[Relay]:
    """A relay started from ``home`` with the relative ``--state-dir r1``."""
    home.mkdir()
    port = free_port()
    (home / "relay.yaml").write_text(f"transport:\n  tls:\n    port: {port}\n")
    env = environment(
        CLOUDBRIDGE_CONFIG=str(home / "relay.yaml"),
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_SERVER__PUBLIC_HOST="127.0.0.1",
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
        CLOUDBRIDGE_METRICS__ENABLED="false",
    )
    process = start(
        *("relay", "serve", "--dev", "--state-dir", "r1"),
        env=env,
        ready="client config:",
        cwd=home,
    )
    try:
        yield Relay(home, Path("r1"), port, env)
    finally:
        assert stop(process) == 0


def assert_works_from_root(config: Path, env: dict[str, str]) -> None:
    """``config validate`` and ``health`` succeed from /, with the config named absolutely."""
    assert config.is_absolute()
    validated = cloudbridge("config", "validate", str(config), cwd=ROOT, env=env)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    health = cloudbridge("health", "--config", str(config), "--format", "json", cwd=ROOT, env=env)
    assert health.returncode == 0, health.stdout + health.stderr
    assert json.loads(health.stdout)["status"] == "healthy"


def test_the_relays_client_config_works_from_anywhere(tmp_path: Path, echo_port: int) -> None:
    with relay_in(tmp_path / "a") as relay:
        client_yaml = relay.home / relay.state / "client.yaml"
        written = yaml.safe_load(client_yaml.read_text())
        assert written["relay"]["tls"]["ca_file"] == str(relay.home / "r1" / "ca.pem")
        env = environment(
            CLOUDBRIDGE_AUTH__TOKEN=relay.token(),
            CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
            CLOUDBRIDGE_METRICS__ENABLED="false",
        )
        assert_works_from_root(client_yaml, env)
        local = free_port()
        tunnel = start(
            *("tunnel", "--config", str(client_yaml), "--local-port", str(local)),
            *("--control-socket", str(tmp_path / "client.sock")),
            *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
            env=env,
            ready="tunnel 127.0.0.1:",
            cwd=ROOT,
        )
        try:
            assert echo_once(local, b"from /") == b"from /"
        finally:
            assert stop(tunnel) == 0


def test_joined_and_initialised_configs_work_from_anywhere(tmp_path: Path) -> None:
    client = tmp_path / "client"
    client.mkdir()
    env = environment(
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket", CLOUDBRIDGE_METRICS__ENABLED="false"
    )
    with relay_in(tmp_path / "a") as relay:
        invited = relay.run(
            *("relay", "invite", "create", "--state-dir", str(relay.state), "--tenant", "acme")
        )
        assert invited.returncode == 0, invited.stderr
        joined = cloudbridge(
            *("join", invited.stdout.strip(), "--no-start", "--insecure-storage"),
            *("--config-dir", "j1"),
            cwd=client,
            env=env,
        )
        assert joined.returncode == 0, joined.stderr
        join_yaml = client / "j1" / "config.yaml"
        written = yaml.safe_load(join_yaml.read_text())
        assert written["relay"]["tls"]["ca_file"] == str(client / "j1" / "ca.pem")
        assert written["auth"]["token_file"] == str(client / "j1" / "token")
        assert_works_from_root(join_yaml, env)

        initialised = relay.run(
            *("init", "--non-interactive", "--config-dir", "i1", "--relay-host", "127.0.0.1"),
            *("--transport", "tls", "--relay-port", str(relay.port)),
            *("--ca-file", str(relay.state / "ca.pem"), "--auth", "jwt", "--token-stdin"),
            *("--insecure-storage", "--no-metrics", "--no-service"),
            stdin=relay.token() + "\n",
        )
        assert initialised.returncode == 0, initialised.stderr
        init_yaml = relay.home / "i1" / "config.yaml"
        written = yaml.safe_load(init_yaml.read_text())
        assert written["relay"]["tls"]["ca_file"] == str(relay.home / "r1" / "ca.pem")
        assert written["auth"]["token_file"] == str(relay.home / "i1" / "token")
        assert_works_from_root(init_yaml, env)


def test_a_hand_written_config_with_relative_paths_works_from_anywhere(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    with relay_in(tmp_path / "a") as relay:
        etc.mkdir()
        (etc / "relay-ca.pem").write_bytes((relay.home / relay.state / "ca.pem").read_bytes())
        (etc / "token").write_text(relay.token())
        (etc / "token").chmod(0o600)
        config = etc / "config.yaml"
        config.write_text(
            "relay:\n  host: 127.0.0.1\n"
            "  tls: {ca_file: relay-ca.pem}\n"
            "auth: {token_storage: file, token_file: token}\n"
            f"transport: {{mode: tls, tls: {{port: {relay.port}}}}}\n"
        )
        assert_works_from_root(config, environment(CLOUDBRIDGE_METRICS__ENABLED="false"))


def test_a_missing_file_is_a_config_error_for_every_command(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("relay:\n  host: 127.0.0.1\n  tls:\n    ca_file: ca.pem\n")
    expected = f"relay.tls.ca_file: {tmp_path / 'ca.pem'} does not exist"
    env = environment(CLOUDBRIDGE_AUTH__TOKEN="a.b.c")
    validated = cloudbridge("config", "validate", str(config), cwd=ROOT, env=env)
    assert validated.returncode == 3
    assert any(
        line.startswith(f"{config}:4") and line.endswith(expected)
        for line in validated.stdout.splitlines()
    ), validated.stdout
    tunnel = ("tunnel", "--local-port", "0", "--remote-host", "h", "--remote-port", "1")
    for command in (("health",), tunnel):
        refused = cloudbridge(*command, "--config", str(config), cwd=ROOT, env=env)
        assert refused.returncode == 3, refused.stderr
        assert expected in refused.stderr
        assert "Traceback" not in refused.stderr
