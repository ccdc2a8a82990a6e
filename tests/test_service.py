"""``cloudbridge service install --dry-run`` on Linux: the systemd unit it would write is
valid (``systemd-analyze verify``), hardened (its ``systemd-analyze security`` exposure is
recorded) and holds no secret; an invalid config is refused. systemd is not PID 1 here, so
nothing is started: the unit is checked offline. The launchd plist is parsed back."""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.service.launchd import LABEL, render_plist

BIN = Path(sys.executable).parent
TOKEN = "eyJhbGciOiJSUzI1NiJ9.not-a-real-token.signature"  # must never appear in the unit


def install_dry_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", "service", "install", "--dry-run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )


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
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
    ):
        assert line in unit.splitlines(), line
    assert TOKEN not in unit
    assert "/etc/systemd/system/cloudbridge-client.service" in done.stderr
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
    score = float(re.findall(r"Overall exposure level for \S+: ([\d.]+)", security)[0])
    print(f"systemd-analyze security exposure: {score}")
    assert score < 3.0  # "OK" on systemd's scale (0 best, 10 worst)


def test_the_overlay_alone_brings_cap_net_admin(tmp_path: Path) -> None:
    path = tmp_path / "overlay.yaml"
    path.write_text("relay:\n  host: relay.example.com\np2p:\n  wireguard:\n    enabled: true\n")
    done = install_dry_run(path)
    if done.returncode == 3 and "wireguard" in done.stderr:
        pytest.skip("the WireGuard plugin that owns p2p.wireguard is not installed yet")
    assert "CapabilityBoundingSet=CAP_NET_ADMIN" in done.stdout.splitlines()


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
