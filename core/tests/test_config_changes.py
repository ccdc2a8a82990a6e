"""Which keys a reload changes, and which of them need a restart (``x-restart-required``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudbridge_core.config import load_config
from cloudbridge_core.config.changes import (
    ConfigChanges,
    changed_paths,
    restart_required,
    restart_required_set_by,
)
from cloudbridge_core.config.schema import cli_schema, core_schema
from jsonschema import Draft202012Validator


def config(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, environ={})


def test_changed_keys_are_leaves_and_lists_count_as_one(tmp_path: Path) -> None:
    before = config(tmp_path, "p2p: {expose: [22]}\nlogging: {level: info}\n")
    after = config(
        tmp_path,
        "p2p: {expose: [22, 80], name: db1}\nlogging: {level: debug}\n"
        "tunnels: [{local_port: 8080, remote_host: h, remote_port: 80}]\n",
    )
    changes = ConfigChanges.between(before, after)
    assert changes.changed == ("logging.level", "p2p.expose", "p2p.name", "tunnels")
    assert changes.restart_required == ("p2p.name",)
    assert changes.touches("p2p")
    assert not changes.touches("metrics")
    assert ConfigChanges.between(after, after) == ConfigChanges((), ())


def test_a_marked_section_covers_its_keys_and_plugin_fragments() -> None:
    schema = {
        "properties": {
            "transport": {
                "properties": {
                    "quic": {
                        "allOf": [
                            {"type": "object"},
                            {"properties": {"port": {"x-restart-required": True}}},
                        ]
                    }
                }
            },
            "server": {
                "properties": {
                    "tenants": {"additionalProperties": {"x-restart-required": True}},
                    "tls": {"x-restart-required": True, "properties": {"cert": {}}},
                }
            },
        }
    }
    paths = changed_paths(
        {"transport": {"quic": {"port": 1, "idle": 1}}, "server": {"tls": {"cert": "a"}}},
        {
            "transport": {"quic": {"port": 2, "idle": 2}},
            "server": {"tls": {"cert": "b"}, "tenants": {"acme": 1}},
        },
    )
    assert restart_required(paths, schema) == [
        "server.tenants.acme",
        "server.tls",
        "transport.quic.port",
    ]


def test_the_keys_a_file_sets_that_need_a_restart(tmp_path: Path) -> None:
    loaded = config(tmp_path, "p2p:\n  name: db1\n  fallback_enabled: false\n  expose: [22]\n")
    assert restart_required_set_by(loaded, str(tmp_path / "c.yaml")) == [
        "p2p.fallback_enabled",
        "p2p.name",
    ]
    assert restart_required_set_by(loaded, "default") == []


def test_marks_sit_on_declared_keys() -> None:
    """An ``x-restart-required`` outside ``properties`` would mark nothing."""
    found = []
    stack: list[tuple[str, Any]] = [("", core_schema())]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            if node.get("x-restart-required") is not None:
                found.append(path)
                assert node["x-restart-required"] is True, path
            for key, child in node.get("properties", {}).items():
                stack.append((f"{path}.{key}".lstrip("."), child))
    assert "p2p.name" in found
    assert "tunnels" not in found


def test_config_validate_lists_the_keys_that_need_a_restart(
    cloudbridge: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("p2p:\n  name: db1\n  expose: [22]\nlogging:\n  level: debug\n")
    as_json = cloudbridge("config", "validate", str(path), "--json")
    assert as_json.code == 0
    document = as_json.json()
    Draft202012Validator(cli_schema("config-validate")).validate(document)
    assert document["restart_required"] == ["p2p.name"]
    text = cloudbridge("config", "validate", str(path))
    assert "need a restart to take effect (a reload does not apply them): p2p.name" in text.err
    path.write_text("p2p:\n  expose: [22]\n")
    assert cloudbridge("config", "validate", str(path), "--json").json()["restart_required"] == []
