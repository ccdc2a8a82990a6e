"""The config schema keeps its own rules: one key style, one duration style, defaults, no drift."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.config.schema import core_schema
from cloudbridge_core.errors import ConfigError
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "core" / "src" / "cloudbridge_core" / "schemas"
EXAMPLE_ENV = {"CLOUDBRIDGE_TOKEN": "t", "TURN_USER": "u", "TURN_PASS": "p", "WG_PRIVATE_KEY": "k"}
DURATION_KEY = re.compile(r"(_timeout|_interval|_delay|^timeout|^jitter)$")


def properties(
    node: Mapping[str, Any], path: str = ""
) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(dotted path, key, sub-schema) of every declared property, items included."""
    for key, child in node.get("properties", {}).items():
        yield f"{path}.{key}".lstrip("."), key, child
        yield from properties(child, f"{path}.{key}".lstrip("."))
        if isinstance(child.get("items"), Mapping):
            yield from properties(child["items"], f"{path}.{key}[]".lstrip("."))
    for child in node.get("patternProperties", {}).values():
        yield from properties(child, f"{path}.*")


def test_schemas_are_valid_and_shipped_copies_do_not_drift() -> None:
    sources = sorted((ROOT / "schemas").rglob("*.schema.json"))
    assert {p.relative_to(ROOT / "schemas") for p in sources} == {
        p.relative_to(SHIPPED) for p in SHIPPED.rglob("*.schema.json")
    }
    for source in sources:
        shipped = SHIPPED / source.relative_to(ROOT / "schemas")
        assert shipped.read_bytes() == source.read_bytes(), f"{shipped} differs from {source}"
    Draft202012Validator.check_schema(core_schema())


def test_example_config_is_complete_and_valid() -> None:
    example = ROOT / "docs" / "config.example.yaml"
    config = load_config(example, environ=EXAMPLE_ENV)
    assert set(config.data) == set(core_schema()["properties"])


def test_keys_are_snake_case_and_durations_one_style() -> None:
    for path, key, node in properties(core_schema()):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", key), path
        if DURATION_KEY.search(key):
            assert node.get("$ref") == "#/$defs/duration", f"{path} must be a duration"
        assert not re.search(r"_(ms|seconds|secs|mb)$", key), f"{path}: write a duration or bytes"


def test_objects_are_closed_and_leaves_have_defaults() -> None:
    for path, _key, node in properties(core_schema()):
        if "x-cloudbridge-plugin" in node:
            continue  # a plugin's section: its plugin closes it
        if "properties" in node:
            assert node.get("additionalProperties") is False, path
            assert "default" not in node, f"{path}: defaults live on the leaves"
        elif "[]" not in path and ".*" not in path:
            assert "default" in node, f"{path} has no default"
        assert node.get("description") or "[]" in path or ".*" in path, f"{path} has no description"


@pytest.mark.parametrize(
    ("yaml_text", "path"),
    [
        ("relay: {connect_timeout: 5000}\n", "relay.connect_timeout"),
        ("metrics: {port: 0}\n", "metrics.port"),
        ("transport: {mode: QUIC}\n", "transport.mode"),
        ("tunnels: [{local_port: 80, remote_host: h}]\n", "tunnels.0"),
        ("p2p: {ice: {stun_servers: ['stun.example.com']}}\n", "p2p.ice.stun_servers.0"),
        ("p2p: {mesh: {peer_ip: 10.0.0.300}}\n", "p2p.mesh.peer_ip"),
        ("retry: {per_error: {invalid_token: {max_retries: 3}}}\n", "retry.per_error"),
        ("plugins: {enabled: [Quic]}\n", "plugins.enabled.0"),
        ("logging: {format: xml}\n", "logging.format"),
    ],
)
def test_bad_values_are_reported_at_their_path(tmp_path: Path, yaml_text: str, path: str) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, environ={})
    assert [issue.path for issue in caught.value.issues] == [path]


def test_every_key_is_documented() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    for path, _key, node in properties(core_schema()):
        if "properties" not in node and "[]" not in path and ".*" not in path:
            assert f"`{path}`" in documented, f"{path} is missing from docs/configuration.md"
