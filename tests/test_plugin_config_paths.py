"""Plugins' file settings are paths like the core's: relative to the config file, checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.config.paths import path_keys
from cloudbridge_core.config.schema import Schema
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.plugins import load_plugins


@pytest.fixture(scope="module")
def schema() -> Schema:
    return merged_schema(load_plugins().config_sections())


def _named_like_paths(node: Any, path: tuple[str, ...] = ()) -> set[str]:
    found = set()
    if isinstance(node, dict):
        if path and path[-1].endswith(("_file", "_dir")):
            found.add(".".join(path))
        for key, child in node.get("properties", {}).items():
            found |= _named_like_paths(child, (*path, key))
        for child in node.get("allOf", []):
            found |= _named_like_paths(child, path)
    return found


def test_every_file_setting_of_every_plugin_is_marked_as_a_path(schema: Schema) -> None:
    marked = {".".join(key.path) for key in path_keys(schema)}
    assert {"auth.jwt.public_key_file", "metrics.pushgateway.ca_file"} <= marked
    assert _named_like_paths(schema) <= marked


def test_plugin_paths_are_relative_to_the_config_file(
    schema: Schema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    (tmp_path / "signing.pub.pem").write_text("a key\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "auth:\n  jwt:\n    public_key_file: signing.pub.pem\n"
        "metrics:\n  pushgateway:\n    ca_file: missing-ca.pem\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, environ={}, schema=schema)
    [issue] = caught.value.issues
    assert (issue.path, issue.message) == (
        "metrics.pushgateway.ca_file",
        f"{tmp_path / 'missing-ca.pem'} does not exist",
    )
    (tmp_path / "missing-ca.pem").write_text("a CA\n")
    config = load_config(config_file, environ={}, schema=schema)
    assert config.get("auth.jwt.public_key_file") == str(tmp_path / "signing.pub.pem")
    assert config.get("metrics.pushgateway.ca_file") == str(tmp_path / "missing-ca.pem")
