"""The ``cloudbridge`` command as users and scripts see it: output, JSON shapes, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from cloudbridge_core import errors
from cloudbridge_core.cli.main import run
from cloudbridge_core.config.schema import cli_schema
from jsonschema import Draft202012Validator

Invoke = Callable[..., Any]

THREE_ERRORS = """\
relay:
  host: relay.example.com
transport:
  tls:
    port: 70000
logging:
  level: loud
tunels: []
"""

COMMAND_PLUGIN = """
import click
from cloudbridge_core.hookspecs import hookimpl


@hookimpl
def cloudbridge_commands(cli):
    @cli.command()
    def hello():
        "Say hello from a plugin."
        click.echo("hello from a plugin")
"""


def assert_matches(document: object, schema_name: str) -> None:
    Draft202012Validator(cli_schema(schema_name)).validate(document)


def test_help_and_usage_errors(cloudbridge: Invoke) -> None:
    result = cloudbridge("--help")
    assert result.code == 0
    assert "plugins" in result.out
    assert "config" in result.out
    assert cloudbridge("no-such-command").code == 2
    assert cloudbridge("config", "show", "--no-such-flag").code == 2


def test_plugins_list_shows_active_and_failed(
    cloudbridge: Invoke,
    install_plugin: Callable[..., None],
    transport_plugin: Callable[..., str],
) -> None:
    install_plugin("fast", transport_plugin("fast"))
    install_plugin("broken", "raise RuntimeError('boom')")
    result = cloudbridge("plugins", "list", "--json")
    assert result.code == 0
    document = result.json()
    assert_matches(document, "plugins-list")
    records = {p["name"]: p for p in document["plugins"]}
    assert records["fast"]["status"] == "active"
    assert records["tls"]["builtin"] is True
    assert records["broken"]["status"] == "failed"
    assert "boom" in records["broken"]["error"]
    text = cloudbridge("plugins", "list")
    assert text.code == 0
    assert "failed" in text.out
    assert "boom" in text.out


def test_selecting_a_broken_plugin_is_an_error(
    cloudbridge: Invoke, install_plugin: Callable[..., None]
) -> None:
    install_plugin("broken", "raise RuntimeError('boom')")
    assert cloudbridge("--plugin", "broken", "plugins", "list").code == 0
    result = cloudbridge("--plugin", "broken", "config", "show")
    assert result.code == 1
    assert "plugin 'broken' was selected but failed to load" in result.err


def test_unknown_plugin_name_lists_installed(cloudbridge: Invoke) -> None:
    result = cloudbridge("--plugin", "nope", "plugins", "list")
    assert result.code == 2
    assert "unknown plugin 'nope' (from --plugin); installed plugins: " in result.err
    assert "tls" in result.err.split("installed plugins: ")[1]


def test_unknown_plugin_in_config_is_a_config_error(cloudbridge: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  disabled: [carrier-pigeon]\n")
    result = cloudbridge("--config", str(path), "plugins", "list")
    assert result.code == 3
    assert "plugins.disabled: unknown plugin 'carrier-pigeon'; installed plugins: " in result.err


def test_unwritable_log_file_falls_back_to_stderr(cloudbridge: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"logging:\n  output: {tmp_path}/missing-dir/x.log\n")
    result = cloudbridge("--config", str(path), "plugins", "list", "--json")
    assert result.code == 0
    assert "cannot log to" in result.err
    assert result.json()["schema_version"] == 1


def test_plugin_commands(cloudbridge: Invoke, install_plugin: Callable[..., None]) -> None:
    install_plugin("greeter", COMMAND_PLUGIN)
    assert cloudbridge("hello").out == "hello from a plugin\n"
    assert "hello" in cloudbridge("--help").out
    assert cloudbridge("--no-plugins", "hello").code == 2


def test_config_validate_reports_three_errors(cloudbridge: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(THREE_ERRORS)
    result = cloudbridge("config", "validate", str(path))
    assert result.code == 3
    lines = result.out.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "transport.tls.port",
        "logging.level",
        "tunels",
    ]
    assert [line.split(": ")[0] for line in lines] == [
        f"{path}:5:5",
        f"{path}:7:3",
        f"{path}:8:1",
    ]
    as_json = cloudbridge("config", "validate", str(path), "--json")
    assert as_json.code == 3
    assert_matches(as_json.json(), "config-validate")
    assert [e["path"] for e in as_json.json()["errors"]] == [
        "transport.tls.port",
        "logging.level",
        "tunels",
    ]


def test_config_validate_warns_about_a_known_provider_that_is_not_active(
    cloudbridge: Invoke, tmp_path: Path
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("transport:\n  mode: quic\n")
    result = cloudbridge("--no-plugins", "config", "validate", str(path), "--json")
    assert result.code == 0
    document = result.json()
    assert document["valid"] is True
    assert any("transport 'quic'" in w and "disabled" in w for w in document["warnings"])
    assert cloudbridge("config", "validate", str(tmp_path / "missing.yaml")).code == 3


def test_config_show_redacts_and_tells_origins(
    cloudbridge: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("auth:\n  token: ${MY_SECRET_TOKEN}\n")
    monkeypatch.setenv("MY_SECRET_TOKEN", "eyJsecret.value.here")
    monkeypatch.setenv("CLOUDBRIDGE_RELAY__HOST", "env.example.com")
    result = cloudbridge(
        "--config", str(path), "--log-level", "debug", "config", "show", "--json", "--origin"
    )
    assert result.code == 0
    assert "eyJsecret" not in result.out + result.err
    document = result.json()
    assert document["config"]["auth"]["token"] == "<redacted>"
    assert document["origins"]["auth.token"] == f"{path}:2"
    assert document["origins"]["relay.host"] == "env CLOUDBRIDGE_RELAY__HOST"
    assert document["origins"]["logging.level"] == "flag --log-level"
    text = cloudbridge("--config", str(path), "config", "show", "--origin")
    assert "relay.host = env.example.com  # env CLOUDBRIDGE_RELAY__HOST" in text.out
    assert "eyJsecret" not in text.out


def test_missing_explicit_config_exits_3(cloudbridge: Invoke, tmp_path: Path) -> None:
    result = cloudbridge("--config", str(tmp_path / "nope.yaml"), "config", "show", "--json")
    assert result.code == 3
    assert_matches(json.loads(result.err), "error")


def test_version_and_completion(cloudbridge: Invoke) -> None:
    result = cloudbridge("version", "--json")
    assert result.code == 0
    assert_matches(result.json(), "version")
    assert result.json()["core"]["distribution"] == "cloudbridge-core"
    for shell in ("bash", "zsh", "fish"):
        script = cloudbridge("completion", shell)
        assert script.code == 0
        assert "_CLOUDBRIDGE_COMPLETE" in script.out


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (errors.ConfigError([errors.ConfigIssue("a.b", "bad")]), 3),
        (errors.InvalidToken("bad token"), 4),
        (errors.TokenExpired("expired"), 4),
        (errors.Unauthorized("no"), 4),
        (errors.ServerUnavailable("relay down"), 5),
        (errors.ConnectionTimeout("slow"), 5),
        (errors.Unhealthy("degraded"), 6),
        (errors.TunnelClosed("closed"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_exit_codes(raised: BaseException, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    @click.command()
    def failing() -> None:
        raise raised

    assert run(failing, []) == code
    if isinstance(raised, errors.CloudBridgeError):
        assert f"({raised.code})" in capsys.readouterr().err


def test_completion_answers_from_the_installed_command() -> None:
    script = Path(sys.executable).with_name("cloudbridge")
    environment = {
        **os.environ,
        "_CLOUDBRIDGE_COMPLETE": "bash_complete",
        "COMP_WORDS": "cloudbridge config ",
        "COMP_CWORD": "2",
    }
    result = subprocess.run([script], capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0
    assert result.stdout.split() == ["plain,path", "plain,show", "plain,validate"]


#: what only connecting, serving metrics or keeping a token in the keyring needs
HEAVY_MODULES = (
    "keyring",
    "prometheus_client",
    "cryptography",
    "aioice",
    "watchfiles",
    "cloudbridge_core.client.link",
)


@pytest.mark.parametrize("args", [["version"], ["status", "--help"], ["config", "validate"]])
def test_a_command_imports_only_what_it_runs(args: list[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("relay:\n  host: relay.example.com\n")
    probe = (
        "import contextlib, io, sys\n"
        "from cloudbridge_core.cli.main import cli, run\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = run(cli, ['--config', {str(config)!r}, *{args!r}])\n"
        f"print(code, sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "0 []"
