"""Config errors a person can act on: located to the column, explained in words.

Durations and sizes have minimums, a value naming a provider must name one this host has,
and ``logging.level: warn`` means ``warning``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.config.schema import (
    ProviderChoices,
    config_validator,
    core_schema,
    provider_choices,
)
from cloudbridge_core.durations import parse_duration
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.plugins import FAMILY_WORDS, load_plugins

Invoke = Callable[..., Any]

INSTALLED = {
    "transport": ProviderChoices("transport", ("grpc", "quic", "tls", "websocket")),
    "auth_provider": ProviderChoices("auth provider", ("jwt",), inactive=("kerberos",)),
}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def issues_of(path: Path, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={}, **kw)
    return [str(issue) for issue in caught.value.issues]


def durations(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(dotted path, sub-schema) of every duration the core schema declares."""
    for key, child in node.get("properties", {}).items():
        here = f"{path}.{key}".lstrip(".")
        if child.get("$ref") == "#/$defs/duration":
            yield here, child
        yield from durations(child, here)
        for value in child.get("patternProperties", {}).values():
            yield from durations(value, f"{here}.*")


# --- where ---------------------------------------------------------------------------------


def test_an_unclosed_quote_is_reported_where_it_starts(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        relay:
          host: "relay.example.com
        logging:
          level: info
        """,
    )
    assert issues_of(path) == [
        f"{path}:2:9: <root>: invalid YAML: a quoted string starts here and is not closed"
        " (found unexpected end of stream at line 5)"
    ]


def test_an_unclosed_bracket_is_reported_where_it_starts(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "server:\n  egress:\n    allow: [a.example.com\n  x: 1\n")
    [problem] = issues_of(path)
    assert problem.startswith(f"{path}:3:12: <root>: invalid YAML: a [...] list starts here")


def test_a_bad_indent_is_reported_at_the_bad_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "relay:\n  host: a\n   port: 1\n")
    assert issues_of(path) == [
        f"{path}:3:8: <root>: invalid YAML: mapping values are not allowed here"
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("relay:\n  host: relay.example.com\n  hst:\n    a: 1\n", "3:3"),
        ("relay: {hst: {a: 1}}\n", "1:9"),
        ("relay:\n  hst:\n    nested:\n      deeper: 1\n", "2:3"),
    ],
)
def test_an_unknown_key_holding_a_mapping_is_located(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    assert issues_of(path) == [
        f"{path}:{where}: relay.hst: unknown key 'hst' (did you mean 'host'?)"
    ]


def test_an_unknown_section_from_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"CLOUDBRIDGE_RELAY__HST__A": "1"})
    assert [str(i) for i in caught.value.issues] == [
        "env CLOUDBRIDGE_RELAY__HST__A: relay.hst: unknown key 'hst' (did you mean 'host'?)"
    ]


# --- durations and sizes -------------------------------------------------------------------


def test_a_zero_handshake_timeout_is_refused_in_words(tmp_path: Path) -> None:
    # "0s" turns jitter off: it has no minimum
    path = write(tmp_path / "c.yaml", "server:\n  handshake_timeout: 0s\nretry:\n  jitter: 0s\n")
    assert issues_of(path) == [
        f"{path}:2:3: server.handshake_timeout: 0s is too short: the minimum is 1s"
    ]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("-5s", "; durations cannot be negative"),
        ("5 seconds", ""),
        ("1m 30s", ""),
    ],
)
def test_a_malformed_duration_is_explained_not_pattern_matched(
    tmp_path: Path, value: str, why: str
) -> None:
    path = write(tmp_path / "c.yaml", f"server:\n  drain_timeout: {value}\n")
    assert issues_of(path) == [
        f"{path}:2:3: server.drain_timeout: invalid duration {value!r}: write a number with a"
        f" unit, like 500ms, 30s, 1m30s or 24h{why}"
    ]


KEEP_RUNNING = [
    "relay.connect_timeout",
    "transport.connect_timeout",
    "transport.health_check_interval",
    "p2p.heartbeat_interval",
    "p2p.heartbeat_timeout",
    "p2p.peer_discovery_interval",
    "p2p.upgrade_interval",
    "server.handshake_timeout",
    "server.heartbeat_timeout",
    "server.drain_timeout",
    "server.connect_timeout",
    "retry.max_delay",
    "retry.circuit_breaker.reset_timeout",
]


@pytest.mark.parametrize("key", KEEP_RUNNING)
def test_zero_timeouts_and_intervals_are_refused(key: str) -> None:
    variable = "CLOUDBRIDGE_" + key.replace(".", "__").upper()
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={variable: "0s"})
    [issue] = caught.value.issues
    assert (issue.path, issue.source) == (key, f"env {variable}")
    minimum = issue.message.removeprefix("0s is too short: the minimum is ")
    assert parse_duration(minimum) > 0
    assert load_config(None, environ={variable: minimum}).get(key) == minimum


def test_every_timeout_and_interval_has_a_minimum_it_explains() -> None:
    for path, node in durations(core_schema()):
        minimum = node.get("minDuration")
        if path.endswith(("_timeout", "_interval")):
            assert minimum, f"{path}: a zero timeout or interval never makes sense"
        if minimum is None:
            continue
        assert f"At least {minimum}" in node["description"], path
        if "default" in node:
            assert parse_duration(node["default"]) >= parse_duration(minimum), path


def test_max_duration_bounds_a_plugin_key() -> None:
    schema = {
        "type": "object",
        "properties": {"every": {"type": "string", "minDuration": "1s", "maxDuration": "1h"}},
    }
    messages = [e.message for e in config_validator(schema).iter_errors({"every": "2h"})]
    assert messages == ["2h is too long: the maximum is 1h"]
    assert config_validator(schema).is_valid({"every": "59m"})


def test_byte_sizes_have_sensible_minimums(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml", "logging:\n  max_bytes: 100\nperformance:\n  buffer_size: 1\n"
    )
    assert issues_of(path) == [
        f"{path}:2:3: logging.max_bytes: 100 is less than the minimum of 4096",
        f"{path}:4:3: performance.buffer_size: 1 is less than the minimum of 1024",
    ]


# --- values naming a provider --------------------------------------------------------------


def test_a_transport_nobody_installed_is_refused_naming_the_choices(tmp_path: Path) -> None:
    schema = merged_schema([], INSTALLED)
    path = write(tmp_path / "c.yaml", "transport:\n  mode: quick\n  prefer_protocol: carrier\n")
    assert issues_of(path, schema=schema) == [
        f"{path}:2:3: transport.mode: 'quick' is not an installed transport"
        " (installed: grpc, quic, tls, websocket; or auto); did you mean 'quic'?",
        f"{path}:3:3: transport.prefer_protocol: 'carrier' is not an installed transport"
        " (installed: grpc, quic, tls, websocket)",
    ]
    for mode in ("auto", "grpc"):
        environ = {"CLOUDBRIDGE_TRANSPORT__MODE": mode}
        assert load_config(None, environ=environ, schema=schema).get("transport.mode") == mode


def test_an_auth_provider_nobody_installed_is_refused(tmp_path: Path) -> None:
    schema = merged_schema([], INSTALLED)
    path = write(tmp_path / "c.yaml", "auth:\n  type: ldap\n")
    assert issues_of(path, schema=schema) == [
        f"{path}:2:3: auth.type: 'ldap' is not an installed auth provider (installed: jwt)"
    ]
    # kerberos is installed but disabled, and cloudbridge-oidc exists (auth.oidc is its
    # section): naming either is no typo, and the command that needs it says what to do
    for kind in ("jwt", "kerberos", "oidc"):
        environ = {"CLOUDBRIDGE_AUTH__TYPE": kind}
        assert load_config(None, environ=environ, schema=schema).get("auth.type") == kind


def test_the_choices_come_from_the_plugins_loaded_here(tmp_path: Path) -> None:
    plugins = load_plugins()
    schema = merged_schema(plugins.config_sections(), provider_choices(plugins, FAMILY_WORDS))
    installed = ", ".join(sorted(plugins.providers("transport")))
    path = write(tmp_path / "c.yaml", "transport:\n  mode: carrier-pigeon\n")
    assert issues_of(path, schema=schema) == [
        f"{path}:2:3: transport.mode: 'carrier-pigeon' is not an installed transport"
        f" (installed: {installed}; or auto)"
    ]


# --- logging.level -------------------------------------------------------------------------


def test_warn_is_read_as_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "logging:\n  level: warn\n")
    assert load_config(path, environ={}).get("logging.level") == "warning"
    from_env = load_config(None, environ={"CLOUDBRIDGE_LOGGING__LEVEL": "warn"})
    assert from_env.get("logging.level") == "warning"
    assert load_config(path, environ={}).redacted()["logging"]["level"] == "warning"


# --- the command line ----------------------------------------------------------------------


def test_validate_prints_line_and_column_and_json_has_the_column(
    cloudbridge: Invoke, tmp_path: Path
) -> None:
    path = write(tmp_path / "c.yaml", "relay:\n  host: 'relay.example.com\nlogging: {}\n")
    result = cloudbridge("config", "validate", str(path))
    assert result.code == 3
    assert result.out.startswith(f"{path}:2:9: <root>: invalid YAML: a quoted string starts here")
    [error] = cloudbridge("config", "validate", str(path), "--json").json()["errors"]
    assert (error["line"], error["column"]) == (2, 9)


@pytest.mark.parametrize(
    "command", [("config", "validate"), ("tunnel", "--local-port", "1"), ("relay", "serve")]
)
def test_an_unknown_transport_exits_3_naming_the_field(
    cloudbridge: Invoke, tmp_path: Path, command: tuple[str, ...]
) -> None:
    path = write(tmp_path / "c.yaml", "transport:\n  mode: quick\n")
    result = cloudbridge("--config", str(path), *command)
    assert result.code == 3, result.err
    assert f"{path}:2:3: transport.mode: 'quick' is not an installed transport" in (
        result.out + result.err
    )


def test_validate_reports_every_kind_of_error_in_one_file_with_its_place(
    cloudbridge: Invoke, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        relay:
          hst: relay.example.com
          tls:
            ca_file: missing-ca.pem
        transport:
          mode: quick
          connect_timeout: -5s
        server:
          handshake_timeout: 0s
          egress:
            allow: [1.2.3.4]
            allow: [5.6.7.8]
        metrics:
          prometheus_port: 99999
        tunnels:
          - local_port: 8080
            remote_host: db
        performance:
          connection_pool:
            max_idle_conns: 1
        """,
    )
    result = cloudbridge("config", "validate", str(path))
    assert result.code == 3
    expected = [
        "2:3: relay.hst: unknown key",
        f"4:5: relay.tls.ca_file: {tmp_path / 'missing-ca.pem'} does not exist",
        "6:3: transport.mode: 'quick' is not an installed transport",
        "7:3: transport.connect_timeout: invalid duration '-5s'",
        "9:3: server.handshake_timeout: 0s is too short",
        "12:5: server.egress.allow: duplicate key",
        "14:3: metrics.prometheus_port: 99999 is greater than the maximum of 65535",
        "16:5: tunnels.0: 'remote_port' is a required property",
        "19:3: performance.connection_pool: unknown key",
    ]
    lines = result.out.splitlines()
    for fragment in expected:
        assert any(line.startswith(f"{path}:{fragment}") for line in lines), (fragment, lines)
