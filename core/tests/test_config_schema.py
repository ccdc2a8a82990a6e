"""The config schema keeps its own rules: one key style, one duration style, defaults, no drift.

Also: the example config is complete and valid, plugin sections stay open in the core,
secrets are marked, bad configs are reported at their path, and the CLI ``--json``
output schemas accept what they document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.config.schema import cli_schema, core_schema, defaults, secret_paths
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.plugins import load_plugins
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "schemas"
SHIPPED = ROOT / "core" / "src" / "cloudbridge_core" / "schemas"
EXAMPLE = ROOT / "docs" / "config.example.yaml"
DOCS = ROOT / "docs" / "configuration.md"
SCHEMA_FILES = sorted(p.relative_to(SOURCES).as_posix() for p in SOURCES.rglob("*.json"))
EXAMPLE_ENV = {"CLOUDBRIDGE_TOKEN": "t", "TURN_USER": "u", "TURN_PASS": "p", "WG_PRIVATE_KEY": "k"}

TOP_LEVEL = {
    "relay",
    "auth",
    "p2p",
    "overlay",
    "transport",
    "tunnels",
    "metrics",
    "logging",
    "performance",
    "service",
    "retry",
    "server",
    "plugins",
}
#: dotted path -> the plugin that owns (and, when installed, validates) the section
PLUGIN_SECTIONS = {
    "auth.jwt": "jwt",
    "auth.oidc": "oidc",
    "overlay.wireguard": "wireguard",
    "transport.tls": "tls",  # built into the core, but a plugin like any other (can be disabled)
    "transport.quic": "quic",
    "transport.grpc": "grpc",
    "transport.websocket": "websocket",
    "metrics.pushgateway": "pushgateway",
}
#: leaves that have no default on purpose: optional fields of list items and overrides
OPTIONAL_WITHOUT_DEFAULT = {
    "tunnels[].name",
    "p2p.ice.turn_servers[].username",
    "p2p.ice.turn_servers[].credential",
    *(
        f"retry.per_error.*.{key}"
        for key in ("initial_delay", "multiplier", "max_delay", "jitter", "max_retries")
    ),
    # a tenant's quota names both (required); a kind it leaves out keeps the relay's quota
    *(
        f"server.rate_limits.tenants.*.{kind}.{key}"
        for kind in ("control_messages", "mux_pings", "stream_opens")
        for key in ("rate", "burst")
    ),
    # a tenant's own overlay pool names it (required): no default to fall back on
    "server.overlay.tenants.*.pool",
}
DURATION_KEY = re.compile(r"(_timeout|_interval|_delay|_rtt|_ttl|^timeout|^jitter|^delay)$")
SECRET_KEY = re.compile(r"^(token|credential)$|secret|password|private_key")
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def properties(
    node: Mapping[str, Any], path: str = ""
) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(dotted path, key, sub-schema) of every declared property.

    List items are walked as ``key[]``, map values (``patternProperties`` or a schema in
    ``additionalProperties``) as ``key.*``.
    """
    for key, child in node.get("properties", {}).items():
        here = f"{path}.{key}".lstrip(".")
        yield here, key, child
        yield from properties(child, here)
        if isinstance(child.get("items"), Mapping):
            yield from properties(child["items"], f"{here}[]")
        values = [*child.get("patternProperties", {}).values()]
        if isinstance(child.get("additionalProperties"), Mapping):
            values.append(child["additionalProperties"])
        for value in values:
            yield from properties(value, f"{here}.*")


def is_leaf(node: Mapping[str, Any]) -> bool:
    return "properties" not in node and "x-cloudbridge-plugin" not in node


def in_collection(path: str) -> bool:
    return "[]" in path or ".*" in path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


# --- the files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_file_is_valid_2020_12_and_shipped_unchanged(name: str) -> None:
    source = SOURCES / name
    schema = json.loads(source.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://cloudbridge.dev/schemas/{name}"
    Draft202012Validator.check_schema(schema)
    shipped = SHIPPED / name
    assert shipped.is_file(), f"{shipped} is missing: copy {source} into the core wheel"
    assert shipped.read_bytes() == source.read_bytes(), f"{shipped} differs from {source}"


def test_shipped_schemas_are_exactly_the_sources() -> None:
    shipped = sorted(p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*.json"))
    assert shipped == SCHEMA_FILES
    assert {"config.schema.json", "cli/plugins-list.schema.json"} <= set(SCHEMA_FILES)
    assert {f"cli/{name}.schema.json" for name in ("version", "config-validate", "error")} <= set(
        SCHEMA_FILES
    )


def test_top_level_sections_are_closed() -> None:
    schema = core_schema()
    assert schema["$id"] == "https://cloudbridge.dev/schemas/config.schema.json"
    assert set(schema["properties"]) == TOP_LEVEL
    assert schema["additionalProperties"] is False
    assert {"duration", "port", "host", "plugin_name"} <= set(schema["$defs"])


# --- the rules the schema keeps ----------------------------------------------------------


def test_keys_are_snake_case() -> None:
    schema = core_schema()
    for path, key, _node in properties(schema):
        assert SNAKE_CASE.fullmatch(key), f"{path} is not snake_case"
    for name in schema["$defs"]:
        assert SNAKE_CASE.fullmatch(name), f"$defs/{name} is not snake_case"
    codes = schema["properties"]["retry"]["properties"]["per_error"]["propertyNames"]["enum"]
    assert all(SNAKE_CASE.fullmatch(code) for code in codes)


def test_durations_are_written_one_way() -> None:
    for path, key, node in properties(core_schema()):
        if DURATION_KEY.search(key):
            assert node.get("$ref") == "#/$defs/duration", f"{path} must be a duration"
        assert not re.search(r"_(ms|msec|seconds|secs|sec|minutes|mb|kb|days)$", key), (
            f"{path}: write a duration, or a size in bytes"
        )


@pytest.mark.parametrize("value", ["500ms", "30s", "1m30s", "1.5s", "24h", "7d", "0s"])
def test_duration_accepts(value: str) -> None:
    duration = {"$defs": core_schema()["$defs"], "$ref": "#/$defs/duration"}
    Draft202012Validator(duration).validate(value)


@pytest.mark.parametrize("value", ["30", "5 s", "1m 30s", "-1s", "s", "30sec", "", "1.s", 5000])
def test_duration_rejects(value: object) -> None:
    duration = {"$defs": core_schema()["$defs"], "$ref": "#/$defs/duration"}
    assert not Draft202012Validator(duration).is_valid(value)


def test_objects_are_closed_unless_a_plugin_owns_them() -> None:
    for path, _key, node in properties(core_schema()):
        if "x-cloudbridge-plugin" in node:
            continue  # a plugin's section: its plugin closes it
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} must be closed"
            assert "default" not in node, f"{path}: defaults live on the leaves"


def test_leaves_have_defaults_and_descriptions() -> None:
    schema = core_schema()
    without_default = set()
    for path, key, node in properties(schema):
        assert node.get("description"), f"{path} has no description"
        if is_leaf(node) and "default" not in node and key not in _required_of(schema, path):
            without_default.add(path)
    assert without_default == OPTIONAL_WITHOUT_DEFAULT


def _required_of(schema: Mapping[str, Any], path: str) -> list[str]:
    """The required keys of the list item holding ``path`` (none outside list items)."""
    parent = path.rpartition(".")[0]
    for candidate, _key, node in properties(schema):
        if parent.endswith("[]") and candidate == parent.removesuffix("[]"):
            required: list[str] = node["items"].get("required", [])
            return required
    return []


def test_defaults_form_a_valid_config() -> None:
    schema = core_schema()
    built = defaults(schema)
    assert set(built) == TOP_LEVEL
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    assert list(validator.iter_errors(built)) == []
    assert load_config(None, environ={}).data == built


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("relay.host", "localhost"),
        ("server.stun_port", 19302),
        ("relay.tls.min_version", "1.3"),
        ("relay.tls.verify_cert", True),
        ("relay.tls.ca_file", None),
        ("auth.type", "jwt"),
        ("auth.token", None),
        ("auth.token_storage", "keyring"),
        ("transport.mode", "auto"),
        ("transport.prefer_protocol", "tls"),
        ("transport.connect_timeout", "5s"),
        ("p2p.ice.stun_servers", []),
        ("tunnels", []),
        ("metrics.prometheus_host", "127.0.0.1"),
        ("metrics.prometheus_port", 9464),
        ("metrics.tenant_labels", False),
        ("logging.level", "info"),
        ("logging.format", "text"),
        ("logging.output", "stderr"),
        ("logging.max_bytes", 104857600),
        ("logging.backup_count", 5),
        ("service.restart_delay", "5s"),
        ("retry.initial_delay", "1s"),
        ("retry.multiplier", 2.0),
        ("retry.max_delay", "60s"),
        ("retry.jitter", "1s"),
        ("retry.max_retries", 5),
        ("retry.per_error.unavailable", {"max_retries": 10, "initial_delay": "10s"}),
        ("retry.circuit_breaker.reset_timeout", "30s"),
        ("plugins.enabled", None),
        ("plugins.disabled", []),
    ],
)
def test_default(key: str, value: object) -> None:
    assert load_config(None, environ={}).get(key) == value


def test_secrets_are_write_only() -> None:
    for path, key, node in properties(core_schema()):
        if SECRET_KEY.search(key):
            assert node.get("writeOnly") is True, f"{path} holds a secret: mark it writeOnly"
    assert {("auth", "token"), ("p2p", "ice", "turn_servers", "*", "credential")} <= secret_paths(
        core_schema()
    )


def test_plugin_sections_are_open_placeholders() -> None:
    found = {
        path: node["x-cloudbridge-plugin"]
        for path, _key, node in properties(core_schema())
        if "x-cloudbridge-plugin" in node
    }
    assert found == PLUGIN_SECTIONS
    for path, name in PLUGIN_SECTIONS.items():
        node = dict(next(n for p, _k, n in properties(core_schema()) if p == path))
        description = node.pop("description")
        assert node == {"type": "object", "x-cloudbridge-plugin": name}, path
        owner = (
            "the tls plugin built into cloudbridge-core"
            if name == "tls"
            else f"the cloudbridge-{name} plugin"
        )
        assert f"Owned by {owner}" in description, path
        assert "which validates it" in description, path


def test_plugin_sections_accept_anything_with_the_core_alone(tmp_path: Path) -> None:
    document: dict[str, Any] = {}
    for path in PLUGIN_SECTIONS:
        section, key = path.split(".")
        document.setdefault(section, {})[key] = {"some_setting": 1, "nested": {"any": ["thing"]}}
    config = load_config(write(tmp_path, yaml.safe_dump(document)), environ={})
    assert config.get("metrics.pushgateway.nested") == {"any": ["thing"]}


# --- the example config ------------------------------------------------------------------


def test_example_validates_as_written() -> None:
    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    schema = core_schema()
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    assert set(document) == TOP_LEVEL


def test_example_sets_every_key_and_every_plugin_section() -> None:
    config = load_config(EXAMPLE, environ=EXAMPLE_ENV)
    assert config.get("auth.token") == "t"
    assert config.redacted()["auth"]["token"] == "<redacted>"
    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for path, _key, _node in properties(core_schema()):
        if in_collection(path):
            continue
        value: Any = document
        for part in path.split("."):
            assert isinstance(value, dict), f"the example does not set {path}"
            assert part in value, f"the example does not set {path}"
            value = value[part]
    for path in PLUGIN_SECTIONS:
        section, key = path.split(".")
        assert isinstance(document[section][key], dict), f"the example has no {path}"


def test_example_validates_with_the_installed_plugins() -> None:
    # a plugin section in the example must also satisfy the plugin's own schema
    schema = merged_schema(load_plugins().config_sections())
    config = load_config(EXAMPLE, environ=EXAMPLE_ENV, schema=schema)
    assert config.get("transport.tls.max_streams") == 1024
    assert config.get("transport.tls.port") == 5556


def test_sections_several_plugins_declare_keep_the_core_node_on_top(
    install_plugin: Callable[..., None],
) -> None:
    # ice and turn both declare the part of p2p.ice they read: the core's node keeps its
    # keys, both fragments join its allOf, and keys stay found by path (environment values
    # are typed by it)
    install_plugin("gauge", EXPORTER_PLUGIN)
    schema = merged_schema(load_plugins().config_sections())
    ice = schema["properties"]["p2p"]["properties"]["ice"]
    assert ice["additionalProperties"] is False
    assert len(ice["allOf"]) == 2
    assert all("allOf" not in part for part in ice["allOf"])
    servers = '["stun:stun.example.com:3478"]'
    config = load_config(
        None, environ={"CLOUDBRIDGE_P2P__ICE__STUN_SERVERS": servers}, schema=schema
    )
    assert config.get("p2p.ice.stun_servers") == ["stun:stun.example.com:3478"]
    # the built-in prometheus exporter declares metrics: an exporter's section below it
    # is still a key the closed metrics section accepts
    assert config.get("metrics.gauge") == {"path": "gauge.prom"}


def test_example_keeps_secrets_out_of_the_file() -> None:
    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert document["auth"]["token"] == "${CLOUDBRIDGE_TOKEN}"
    (turn,) = document["p2p"]["ice"]["turn_servers"]
    assert (turn["username"], turn["credential"]) == ("${TURN_USER}", "${TURN_PASS}")
    assert "private_key" not in document["overlay"]["wireguard"]
    assert "client_secret" not in document["auth"]["oidc"]
    assert document["metrics"]["prometheus_port"] != 9090


EXPORTER_PLUGIN = """
from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, ExporterSpec


@hookimpl
def cloudbridge_exporters():
    return [ExporterSpec(name="gauge", load=lambda settings: settings)]


@hookimpl
def cloudbridge_config_schema():
    return [
        ConfigSection(
            path="metrics.gauge",
            schema={
                "type": "object",
                "additionalProperties": False,
                "properties": {"path": {"type": "string", "default": "gauge.prom"}},
            },
        )
    ]
"""


# --- bad configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "path"),
    [
        ("relay: {connect_timeout: 5000}\n", "relay.connect_timeout"),
        ("relay: {read_timeout: 10s}\n", "relay.read_timeout"),  # removed: nothing read it
        ("relay: {connect_timeout_ms: 5000}\n", "relay.connect_timeout_ms"),
        ("relay: {ports: {quic: 5553}}\n", "relay.ports"),  # a transport's port: its section
        ("relay: {tls: {min_version: '1.1'}}\n", "relay.tls.min_version"),
        ("metrics: {prometheus_port: 0}\n", "metrics.prometheus_port"),
        ("metrics: {port: 9464}\n", "metrics.port"),
        ("transport: {mode: QUIC}\n", "transport.mode"),
        ("tunnels: [{local_port: 80, remote_host: h}]\n", "tunnels.0"),
        (
            "tunnels: [{local_port: 70000, remote_host: h, remote_port: 1}]\n",
            "tunnels.0.local_port",
        ),
        ("p2p: {ice: {stun_servers: ['stun.example.com']}}\n", "p2p.ice.stun_servers.0"),
        ("p2p: {ice: {turn_servers: [{url: 'http://t:3478'}]}}\n", "p2p.ice.turn_servers.0.url"),
        ("p2p: {mesh: {peer_ip: 10.0.0.5}}\n", "p2p.mesh"),  # removed until the overlay reads it
        ("performance: {connection_pool: {}}\n", "performance.connection_pool"),
        ("auth: {token_storage: vault}\n", "auth.token_storage"),
        ("retry: {multiplier: 0.5}\n", "retry.multiplier"),
        ("retry: {per_error: {invalid_token: {max_retries: 3}}}\n", "retry.per_error"),
        (
            "retry: {per_error: {timeout: {initial_delay_ms: 3}}}\n",
            "retry.per_error.timeout.initial_delay_ms",
        ),
        ("logging: {format: xml}\n", "logging.format"),
        ("logging: {max_age_days: 30}\n", "logging.max_age_days"),
        ("plugins: {enabled: [Quic]}\n", "plugins.enabled.0"),
        ("scheme: https\n", "scheme"),
    ],
)
def test_bad_values_are_reported_at_their_path(tmp_path: Path, yaml_text: str, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, yaml_text), environ={})
    assert [issue.path for issue in caught.value.issues] == [path]


def test_a_secret_never_appears_in_an_error(tmp_path: Path) -> None:
    config_file = write(tmp_path, "auth: {token: 12345678}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, environ={})
    (issue,) = caught.value.issues
    assert issue.path == "auth.token"
    assert "12345678" not in issue.message


# --- the docs ----------------------------------------------------------------------------


def test_every_key_is_documented() -> None:
    documented = DOCS.read_text(encoding="utf-8")
    table = dict(
        re.findall(r"^\| `([a-z0-9_.]+)` \| [^|]*(?:\\\|[^|]*)* \| ([^|]*) \|", documented, re.M)
    )
    for path, _key, node in properties(core_schema()):
        if "default" in node and not in_collection(path):
            assert table.get(path) == f"`{json.dumps(node['default'])}`", (
                f"docs/configuration.md gives another default for {path}"
            )
    for path, _key, node in properties(core_schema()):
        if "properties" not in node and not in_collection(path):
            assert f"`{path}`" in documented, f"{path} is missing from docs/configuration.md"
    for path in PLUGIN_SECTIONS:
        assert f"`{path}`" in documented, f"{path} is missing from docs/configuration.md"
    for path, key, node in properties(core_schema()):
        if is_leaf(node) and in_collection(path):  # in the tables of list items and maps
            assert f"| `{key}` |" in documented, f"{path} is missing from docs/configuration.md"


# --- CLI --json output schemas -----------------------------------------------------------

PLUGIN_ROW: dict[str, Any] = {
    "name": "tls",
    "distribution": "cloudbridge-core",
    "version": "0.1.0",
    "status": "active",
    "error": None,
    "builtin": True,
    "families": ["transport"],
    "providers": {"transport": ["tls"]},
    "hooks": ["cloudbridge_transports", "cloudbridge_config_schema"],
}
GOOD_DOCUMENTS: dict[str, list[dict[str, Any]]] = {
    "plugins-list": [
        {"schema_version": 1, "plugins": [PLUGIN_ROW]},
        {
            "schema_version": 1,
            "plugins": [
                {
                    **PLUGIN_ROW,
                    "name": "quic",
                    "distribution": "cloudbridge-quic",
                    "status": "failed",
                    "error": "failed to load: ImportError: aioquic",
                    "builtin": False,
                    "families": [],
                    "providers": {},
                    "hooks": [],
                }
            ],
        },
    ],
    "version": [
        {
            "schema_version": 1,
            "core": {"distribution": "cloudbridge-core", "version": "0.1.0"},
            "plugins": [
                {
                    "name": "jwt",
                    "distribution": "cloudbridge-jwt",
                    "version": "0.1.0",
                    "status": "active",
                }
            ],
            "python": {"version": "3.11.9", "implementation": "CPython"},
            "platform": {"system": "Linux", "release": "6.8.0", "machine": "x86_64"},
        }
    ],
    "config-validate": [
        {"schema_version": 1, "valid": True, "source": None, "errors": [], "warnings": []},
        {
            "schema_version": 1,
            "valid": False,
            "source": "/etc/cloudbridge/config.yaml",
            "errors": [
                {
                    "path": "metrics.prometheus_port",
                    "message": "0 is less than the minimum of 1",
                    "line": 3,
                    "source": "/etc/cloudbridge/config.yaml",
                },
                {"path": "relay.host", "message": "...", "line": None, "source": None},
            ],
            "warnings": ["plugin 'quic' is enabled but not installed"],
        },
    ],
    "error": [
        {"error": {"code": "config_invalid", "message": "config is invalid"}},
        {"error": {"code": "unavailable", "message": "relay down", "hint": "cloudbridge netcheck"}},
    ],
}
BAD_DOCUMENTS: dict[str, list[dict[str, Any]]] = {
    "plugins-list": [
        {"plugins": []},
        {"schema_version": 1, "plugins": [{**PLUGIN_ROW, "status": "broken"}]},
        {"schema_version": 1, "plugins": [{k: v for k, v in PLUGIN_ROW.items() if k != "error"}]},
    ],
    "version": [
        {
            "schema_version": 1,
            "core": {"distribution": "cloudbridge", "version": "0.1.0"},
            "plugins": [],
            "python": {"version": "3.11", "implementation": "CPython"},
            "platform": {"system": "Linux", "release": "6", "machine": "x86_64"},
        }
    ],
    "config-validate": [
        {"schema_version": 1, "valid": "no", "source": None, "errors": [], "warnings": []},
        {
            "schema_version": 1,
            "valid": False,
            "source": None,
            "errors": [{"path": "x", "message": "m", "line": "3", "source": None}],
            "warnings": [],
        },
    ],
    "error": [{"error": {"message": "no code"}}, {"code": "timeout", "message": "flat"}],
}


@pytest.mark.parametrize(
    ("name", "document"), [(n, d) for n, docs in GOOD_DOCUMENTS.items() for d in docs]
)
def test_cli_schema_accepts(name: str, document: object) -> None:
    Draft202012Validator(cli_schema(name)).validate(document)


@pytest.mark.parametrize(
    ("name", "document"), [(n, d) for n, docs in BAD_DOCUMENTS.items() for d in docs]
)
def test_cli_schema_rejects(name: str, document: object) -> None:
    with pytest.raises(ValidationError):
        Draft202012Validator(cli_schema(name)).validate(document)


def test_cli_documents_carry_a_schema_version() -> None:
    for path in sorted((SOURCES / "cli").glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "error.schema.json":
            continue  # the error line is the one document without a version (CONVENTIONS §2)
        assert schema["properties"]["schema_version"] == {
            "const": 1,
            "description": "Bumped only on incompatible changes; fields are only ever added.",
        }, path.name
        assert "schema_version" in schema["required"], path.name
