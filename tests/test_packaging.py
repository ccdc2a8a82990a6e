"""The core installs and works alone: `pip install ./core` in a fresh venv, nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from venvs import ROOT, Venv, make_venv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLE_ENV = {"CLOUDBRIDGE_TOKEN": "t", "TURN_USER": "u", "TURN_PASS": "p", "WG_PRIVATE_KEY": "k"}


@pytest.fixture(scope="module")
def core_alone(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A venv made by the stdlib and filled by pip, as a user on a small host would."""
    path = tmp_path_factory.mktemp("core-alone") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run(
        [
            path / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            ROOT / "core",
        ],
        check=True,
    )
    return Venv(path)


def test_help_and_version(core_alone: Venv) -> None:
    assert core_alone.run("cloudbridge", "--help").returncode == 0
    version = core_alone.cloudbridge_json("version")
    assert version["core"]["distribution"] == "cloudbridge-core"
    assert version["plugins"] == []


def test_plugins_list_has_only_the_builtins(core_alone: Venv) -> None:
    document = core_alone.cloudbridge_json("plugins", "list")
    assert document["schema_version"] == 1
    assert [(p["name"], p["status"], p["builtin"]) for p in document["plugins"]] == [
        ("ice", "active", True),
        ("prometheus", "active", True),
        ("tls", "active", True),
    ]


def test_example_config_validates(core_alone: Venv) -> None:
    result = core_alone.run(
        "cloudbridge",
        "config",
        "validate",
        ROOT / "docs" / "config.example.yaml",
        "--json",
        env=EXAMPLE_ENV,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True
    assert any("pip install cloudbridge-jwt" in warning for warning in report["warnings"])


def test_cli_imports_nothing_heavy(core_alone: Venv) -> None:
    probe = (
        "import sys, cloudbridge_core.cli.main;"
        "print(sorted({'aioquic', 'aioice', 'grpc', 'authlib'} & set(sys.modules)))"
    )
    assert core_alone.run("python", "-c", probe).stdout == "[]\n"


def test_wheel_ships_its_schemas(core_alone: Venv) -> None:
    site = Path(
        core_alone.run(
            "python", "-c", "import cloudbridge_core; print(cloudbridge_core.__file__)"
        ).stdout.strip()
    ).parent
    shipped = sorted(p.relative_to(site / "schemas") for p in (site / "schemas").rglob("*.json"))
    assert shipped == sorted(
        p.relative_to(ROOT / "schemas") for p in (ROOT / "schemas").rglob("*.json")
    )


def test_each_plugin_installs_with_only_the_core(tmp_path: Path) -> None:
    for plugin, family in (
        ("jwt", "auth_provider"),
        ("websocket", "transport"),
        ("wireguard", "overlay"),
    ):
        venv = make_venv(tmp_path / plugin)
        venv.install(ROOT / "core", ROOT / "plugins" / f"cloudbridge-{plugin}")
        listed = {p["name"]: p for p in venv.cloudbridge_json("plugins", "list")["plugins"]}
        assert listed[plugin]["status"] == "active", listed[plugin]["error"]
        assert listed[plugin]["families"] == [family]
        assert set(listed) == {"ice", "prometheus", "tls", plugin}
