"""Issue 18, the service and the background client, through the real CLI: ``service
status`` says when systemd or the unit is missing; the unit runs ``tunnel`` or ``p2p`` as
the config says; a token given by a flag or the environment reaches the unit's credential;
``up``/``down``/``logout``; relay and client metrics on different ports. No systemd runs
as PID 1 here: units are checked through ``--dry-run``, systemctl is absent or a stand-in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_process import BIN, environment

pytestmark = pytest.mark.timeout(60)

TOKEN = "eyJhbGciOiJSUzI1NiJ9.not-a-real-token.signature"  # must never appear in a unit
NO_KEYRING = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def cloudbridge(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        env=environment(**NO_KEYRING, **(env or {})),
        cwd=cwd,
        check=False,
        timeout=30,
    )


def tunnel_only(tmp_path: Path) -> Path:
    config = tmp_path / "client.yaml"
    config.write_text(
        "relay:\n  host: relay.example.com\n"
        "p2p:\n  enabled: false\n"
        "tunnels:\n  - {local_port: 15432, remote_host: db, remote_port: 5432}\n"
    )
    return config


def fake_systemctl(tmp_path: Path, stderr: str, code: int) -> dict[str, str]:
    """A PATH whose systemctl answers every call with ``stderr`` and exit ``code``."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {code}\n")
    script.chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_service_status_says_when_systemd_or_the_unit_is_missing(tmp_path: Path) -> None:
    config = tunnel_only(tmp_path)
    no_systemctl = cloudbridge("service", "status", "--config", str(config), env={"PATH": "/"})
    assert no_systemctl.returncode == 1
    assert no_systemctl.stdout == ""
    assert "error: systemd is not available on this machine" in no_systemctl.stderr
    not_booted = cloudbridge(
        "service",
        "status",
        "--config",
        str(config),
        env=fake_systemctl(
            tmp_path, "System has not been booted with systemd as init system (PID 1).", 1
        ),
    )
    assert not_booted.returncode == 1
    assert "error: systemd is not running on this machine" in not_booted.stderr
    no_unit = tmp_path / "no-unit"
    no_unit.mkdir()
    missing = cloudbridge(
        "service",
        "status",
        "--config",
        str(config),
        env=fake_systemctl(no_unit, "Unit cloudbridge-client.service could not be found.", 4),
    )
    assert missing.returncode == 1
    assert "error: the service cloudbridge-client.service is not installed" in missing.stderr
    assert "hint: install it with 'sudo cloudbridge service install" in missing.stderr
    restart = cloudbridge("service", "restart", "--config", str(config), env={"PATH": "/"})
    assert restart.returncode == 1
    assert "systemd is not available" in restart.stderr


def test_the_unit_runs_tunnel_for_a_tunnel_only_config_with_the_given_token(
    tmp_path: Path,
) -> None:
    config = tunnel_only(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    from_file = cloudbridge(
        "--token-file", str(token_file), "service", "install", "--dry-run", "--config", str(config)
    )
    assert from_file.returncode == 0, from_file.stderr
    lines = from_file.stdout.splitlines()
    command = f"{BIN / 'cloudbridge'} --token-file %d/token tunnel --config {config}"
    assert f"ExecStart={command}" in lines
    assert f"LoadCredential=token:{token_file}" in lines
    credential = "/etc/cloudbridge/credentials/cloudbridge-client.token"
    from_env = cloudbridge(
        "service", "install", "--dry-run", "--config", str(config), env={"CLOUDBRIDGE_TOKEN": TOKEN}
    )
    assert from_env.returncode == 0, from_env.stderr
    assert f"LoadCredential=token:{credential}" in from_env.stdout.splitlines()
    assert f"would write {credential} (0600: a copy of the token given by env" in from_env.stderr
    assert TOKEN not in from_env.stdout + from_env.stderr
    from_flag = cloudbridge(
        "--token", TOKEN, "service", "install", "--dry-run", "--config", str(config)
    )
    assert from_flag.returncode == 0, from_flag.stderr
    assert f"LoadCredential=token:{credential}" in from_flag.stdout.splitlines()
    # no token anywhere: refused (exit 4), no unit printed
    none = cloudbridge("service", "install", "--dry-run", "--config", str(config))
    assert none.returncode == 4
    assert none.stdout == ""
    assert "no token is kept for relay.example.com" in none.stderr
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("relay:\n  host: relay.example.com\np2p:\n  enabled: false\n")
    idle = cloudbridge(
        "service", "install", "--dry-run", "--config", str(nothing), env={"CLOUDBRIDGE_TOKEN": "x"}
    )
    assert idle.returncode == 2
    assert "nothing for the service to run" in idle.stderr
