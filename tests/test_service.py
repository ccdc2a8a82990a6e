"""``cloudbridge service install --dry-run`` on Linux: the systemd unit it would write is
valid (``systemd-analyze verify``), hardened (its ``systemd-analyze security`` exposure is
recorded) and holds no secret; an invalid config is refused. systemd is not PID 1 here, so
nothing is started: the unit is checked offline. The launchd plist is parsed back."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.service import windows
from cloudbridge_core.service.launchd import LABEL, render_plist
from secret_service import secret_service

BIN = Path(sys.executable).parent
TOKEN = "eyJhbGciOiJSUzI1NiJ9.not-a-real-token.signature"  # must never appear in the unit
NO_KEYRING = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def install_dry_run(
    config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", "service", "install", "--dry-run", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )


def exposure(unit: str, tmp_path: Path) -> float:
    """``systemd-analyze verify`` passes; the unit's ``security`` exposure (0 best, 10 worst)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax is not checked")
    written = tmp_path / "cloudbridge-client.service"
    written.write_text(unit)
    verified = subprocess.run(
        [analyze, "verify", str(written)], capture_output=True, text=True, check=False
    )
    assert verified.returncode == 0, verified.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(written)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return float(re.findall(r"Overall exposure level for \S+: ([\d.]+)", security)[0])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "client.yaml"
    path.write_text(f"relay:\n  host: relay.example.com\nauth:\n  token: {TOKEN}\n")
    return path


def test_the_unit_is_hardened_valid_and_keeps_the_token_out(config: Path, tmp_path: Path) -> None:
    done = install_dry_run(config)
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    for line in (
        "Type=notify",
        f"ExecStart={BIN / 'cloudbridge'} p2p --config {config}",
        "Restart=on-failure",
        "RestartSec=5s",
        "RestartPreventExitStatus=2 3 4",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
    ):
        assert line in unit.splitlines(), line
    assert TOKEN not in unit
    assert "EnvironmentFile=-/etc/cloudbridge/cloudbridge-client.env" in unit.splitlines()
    assert "/etc/systemd/system/cloudbridge-client.service" in done.stderr
    score = exposure(unit, tmp_path)
    print(f"systemd-analyze security exposure: {score}")
    assert score < 3.0  # "OK" on systemd's scale (0 best, 10 worst)


def test_a_token_file_becomes_a_systemd_credential(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = tmp_path / "client.yaml"
    config.write_text(
        "relay:\n  host: relay.example.com\n"
        f"auth:\n  token_storage: file\n  token_file: {token_file}\n"
    )
    done = install_dry_run(config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"ExecStart={BIN / 'cloudbridge'} --token-file %d/token p2p --config {config}" in lines
    assert f"LoadCredential=token:{token_file}" in lines
    assert exposure(done.stdout, tmp_path) < 3.0


def test_a_token_in_the_keyring_is_copied_to_a_root_only_credential(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("relay:\n  host: relay.example.com\nauth:\n  token_storage: keyring\n")
    none_kept = install_dry_run(config, NO_KEYRING)
    assert none_kept.returncode == 4
    assert "no token is kept for relay.example.com" in none_kept.stderr
    with secret_service(tmp_path / "home") as keyring_env:
        stored = subprocess.run(
            [
                *(sys.executable, "-c", "import keyring, sys; keyring.set_password(*sys.argv[1:])"),
                *("cloudbridge", "relay.example.com", TOKEN),
            ],
            env={**os.environ, **keyring_env},
            check=False,
        )
        assert stored.returncode == 0
        done = install_dry_run(config, keyring_env)
    assert done.returncode == 0, done.stderr
    credential = "/etc/cloudbridge/credentials/cloudbridge-client.token"
    assert f"LoadCredential=token:{credential}" in done.stdout.splitlines()
    assert f"would write {credential} (0600: a copy of the stored token)" in done.stderr
    assert TOKEN not in done.stdout + done.stderr


def test_the_overlay_alone_brings_cap_net_admin(tmp_path: Path) -> None:
    path = tmp_path / "overlay.yaml"
    path.write_text(
        "relay:\n  host: relay.example.com\nauth:\n  token: ${CLOUDBRIDGE_TOKEN}\n"
        "overlay:\n  enabled: true\n"
    )
    done = install_dry_run(path, {"CLOUDBRIDGE_TOKEN": TOKEN})
    unit = done.stdout.splitlines()
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in unit
    assert "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in unit
    assert "PrivateDevices=no" in unit  # /dev/net/tun for wireguard-go
    assert "RuntimeDirectory=cloudbridge wireguard" in unit


def test_an_invalid_config_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("service:\n  restart_delay: soon\n")
    done = install_dry_run(path)
    assert done.returncode == 3
    assert done.stdout == ""
    assert "service.restart_delay" in done.stderr


def test_the_launchd_job_parses_back(config: Path, tmp_path: Path) -> None:
    loaded = load_config(config, environ={})
    job = plistlib.loads(render_plist(loaded, config, BIN / "cloudbridge", tmp_path))
    assert job["Label"] == LABEL
    assert job["ProgramArguments"] == [str(BIN / "cloudbridge"), "p2p", "--config", str(config)]
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["StandardErrorPath"] == str(tmp_path / "cloudbridge.err.log")
    assert TOKEN not in str(job)


def test_the_windows_service_definition(config: Path) -> None:
    """What `service install` registers on Windows (pywin32 cannot run here: the
    registration itself is type-checked against typeshed's pywin32 stubs only)."""
    service = windows.definition(load_config(config, environ={}), config)
    assert service == {
        "name": "CloudBridge",
        "display_name": "CloudBridge client",
        "description": "CloudBridge client",
        "class": "cloudbridge_core.service.windows_host.CloudBridgeService",
        "start_type": "auto",
        "account": r"NT AUTHORITY\LocalService",
        "config": str(config.resolve()),
        "command": "p2p",
        "failure_actions": {
            "reset_period_seconds": 86400,
            "actions": [{"type": "restart", "delay_ms": 5000}] * 3,
        },
    }
    host = Path(windows.__file__).with_name("windows_host.py")
    classes = [
        node.name for node in ast.parse(host.read_text()).body if isinstance(node, ast.ClassDef)
    ]
    assert classes == [service["class"].rsplit(".", 1)[1]]
    assert TOKEN not in json.dumps(service)
    requirements = importlib.metadata.requires("cloudbridge-core") or []
    assert "pywin32>=306; (sys_platform == 'win32') and extra == 'windows'" in requirements
