"""Config loading: precedence, origins, interpolation, every error located, plugin sections."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from cloudbridge_core.config import load_config, merged_schema, search_path
from cloudbridge_core.config.loader import SYSTEM_CONFIG
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.providers import ConfigSection


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def issues_of(path: Path | None, environ: dict[str, str] | None = None, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {}, **kw)  # type: ignore[arg-type]
    return [str(issue) for issue in caught.value.issues]


def test_defaults_come_from_the_schema() -> None:
    config = load_config(None, environ={})
    assert config.get("server.stun_port") == 19302
    assert config.get("metrics.prometheus_port") != 9090  # Prometheus' own port
    assert config.get("logging.level") == "info"
    assert config.get("transport.mode") == "auto"
    assert config.origin(("relay", "host")).source == "default"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        relay:
          host: from-file.example.com
        server:
          stun_port: 6000
        logging:
          level: warning
        """,
    )
    environ = {
        "CLOUDBRIDGE_RELAY__HOST": "from-env.example.com",
        "CLOUDBRIDGE_METRICS__PROMETHEUS_PORT": "6001",
        "CLOUDBRIDGE_P2P__ENABLED": "false",
        "CLOUDBRIDGE_P2P__ICE__STUN_SERVERS": '["stun:stun.example.com:3478"]',
    }
    config = load_config(
        path, environ=environ, overrides={"logging.level": ("debug", "--log-level")}
    )
    assert config.get("relay.host") == "from-env.example.com"
    assert config.get("server.stun_port") == 6000
    assert config.get("metrics.prometheus_port") == 6001
    assert config.get("p2p.enabled") is False
    assert config.get("p2p.ice.stun_servers") == ["stun:stun.example.com:3478"]
    assert config.get("logging.level") == "debug"
    assert str(config.origin(("relay", "host"))) == "env CLOUDBRIDGE_RELAY__HOST"
    assert str(config.origin(("server", "stun_port"))) == f"{path}:4"
    assert str(config.origin(("logging", "level"))) == "flag --log-level"
    assert str(config.origin(("server", "listen"))) == "default"


def test_interpolation_and_unset_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        auth:
          token: "${MY_TOKEN}"
        relay:
          host: "${RELAY_HOST}"
        """,
    )
    config = load_config(path, environ={"MY_TOKEN": "abc", "RELAY_HOST": "r.example.com"})
    assert config.get("auth.token") == "abc"
    assert config.redacted()["auth"]["token"] == "<redacted>"
    assert issues_of(path, {"MY_TOKEN": "abc"}) == [
        f"{path}:4:3: relay.host: environment variable RELAY_HOST is not set"
        " (referenced as ${RELAY_HOST})"
    ]


def test_every_error_is_reported_with_path_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        relay:
          hst: relay.example.com
        server:
          stun_port: "fast"
        transport:
          connect_timeout: 5000
        """,
    )
    found = issues_of(path)
    assert len(found) == 3
    assert found[0] == f"{path}:2:3: relay.hst: unknown key 'hst' (did you mean 'host'?)"
    assert found[1].startswith(f"{path}:4:3: server.stun_port: 'fast' is not of type 'integer'")
    assert found[2] == (
        f"{path}:6:3: transport.connect_timeout: invalid duration 5000:"
        " write a number with a unit, like 500ms, 30s, 1m30s or 24h"
    )


def test_environment_errors_name_the_variable() -> None:
    found = issues_of(None, {"CLOUDBRIDGE_SERVER__STUN_PORT": "many"})
    assert found == [
        "env CLOUDBRIDGE_SERVER__STUN_PORT: server.stun_port: 'many' is not of type 'integer'"
    ]


def test_yaml_problems_are_located(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.yaml", "relay:\n  host: [unclosed\n")
    [problem] = issues_of(broken)
    assert problem.startswith(f"{broken}:")
    assert "invalid YAML" in problem
    twice = write(tmp_path / "twice.yaml", "relay:\n  host: a\n  host: b\n")
    assert issues_of(twice) == [f"{twice}:3:3: relay.host: duplicate key"]
    scalar = write(tmp_path / "scalar.yaml", "just a string\n")
    assert issues_of(scalar) == [f"{scalar}:1: <root>: the file must hold a mapping of sections"]


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "auth:\n  token: 12345678901234\n")
    [problem] = issues_of(path)
    assert "auth.token" in problem
    assert "12345678901234" not in problem


def test_plugin_sections_validate_when_installed(tmp_path: Path) -> None:
    section = ConfigSection(
        path="transport.quic",
        schema={
            "type": "object",
            "additionalProperties": False,
            "properties": {"max_idle_timeout": {"$ref": "#/$defs/duration", "default": "30s"}},
        },
    )
    path = write(tmp_path / "c.yaml", "transport:\n  quic:\n    max_idle_timout: 30s\n")
    # the core alone accepts a plugin's section as it is ...
    assert load_config(path, environ={}).get("transport.quic") == {"max_idle_timout": "30s"}
    # ... and with the plugin installed, its schema checks it and supplies defaults
    schema = merged_schema([section])
    assert issues_of(path, schema=schema) == [
        f"{path}:3:5: transport.quic.max_idle_timout: unknown key 'max_idle_timout'"
        " (did you mean 'max_idle_timeout'?)"
    ]
    assert (
        load_config(None, environ={}, schema=schema).get("transport.quic.max_idle_timeout") == "30s"
    )


def test_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert search_path(None, {}) in (None, SYSTEM_CONFIG)
    (tmp_path / "cloudbridge").mkdir()
    user = write(tmp_path / "cloudbridge" / "config.yaml", "{}\n")
    assert search_path(None, {}) == user
    explicit = write(tmp_path / "explicit.yaml", "{}\n")
    assert search_path(None, {"CLOUDBRIDGE_CONFIG": str(explicit)}) == explicit
    with pytest.raises(ConfigError, match="config file not found \\(--config\\)"):
        search_path(tmp_path / "missing.yaml", {})
