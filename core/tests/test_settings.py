"""Every config key has a typed home and a reader: no key is accepted and then ignored."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.config.schema import core_schema
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core" / "src" / "cloudbridge_core"
#: keys of a plugin's section the core reads for it (a transport's port, an exporter's switch)
READ_BY_THE_CORE = {"port", "enabled"}
#: sections the core's schema declares for its built-in providers (read as their mappings)
PROVIDER_SECTIONS = {"p2p.ice"}


def _merged(node: Mapping[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for part in [node, *node.get("allOf", [])]:
        properties.update(part.get("properties", {}))
    return properties


def _core_owned(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Each (dotted section path, schema node) the core's dataclasses must cover."""
    for key, child in _merged(schema).items():
        path = f"{prefix}{key}"
        if "x-cloudbridge-plugin" in child or path in PROVIDER_SECTIONS:
            continue
        yield path, child


def _dataclass_of(hint: Any) -> Any:
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
        for inner in typing.get_args(candidate):
            if dataclasses.is_dataclass(inner):
                return inner
    return None


def _fields(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _typed_keys(cls: Any, node: Mapping[str, Any], prefix: str) -> Iterator[str]:
    """Schema keys under ``node`` with no field in ``cls``, and fields with no schema key."""
    hints = _fields(cls)
    declared = dict(_core_owned(node, prefix))
    for path, child in declared.items():
        name = path.rsplit(".", 1)[-1]
        if name not in hints:
            yield f"{path}: in the schema, not in {cls.__name__}"
            continue
        nested = _dataclass_of(hints[name])
        items = child.get("items") or {}
        patterns = list(child.get("patternProperties", {}).values())
        extra = child.get("additionalProperties")
        shape = items or (patterns[0] if patterns else extra if isinstance(extra, dict) else child)
        if nested is not None:
            yield from _typed_keys(nested, shape, f"{path}.")
    owned = {path.rsplit(".", 1)[-1] for path in declared}
    for name in hints:
        if name not in owned:
            yield f"{prefix}{name}: in {cls.__name__}, not in the schema"


def test_every_core_key_has_a_typed_field_and_every_field_a_key() -> None:
    assert list(_typed_keys(Settings, core_schema(), "")) == []


def _attribute_readers(field: str, roots: list[Path]) -> bool:
    pattern = re.compile(rf"\.{field}\b")
    return any(
        pattern.search(path.read_text(encoding="utf-8"))
        for root in roots
        for path in root.rglob("*.py")
        if "settings" not in path.parts
    )


def _all_fields(cls: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    for name, hint in _fields(cls).items():
        nested = _dataclass_of(hint)
        if nested is not None and prefix + name not in ("tunnels",):
            yield from _all_fields(nested, f"{prefix}{name}.")
        if nested is None or prefix + name == "tunnels":
            yield f"{prefix}{name}", name


@pytest.mark.parametrize(
    ("path", "field"),
    [pair for pair in _all_fields(Settings) if not pair[0].startswith("tunnels")],
)
def test_every_core_setting_is_read(path: str, field: str) -> None:
    assert _attribute_readers(field, [CORE]), f"nothing in the core reads {path}"


def _key_readers(key: str, roots: list[Path], skip: str = "hooks.py") -> bool:
    pattern = re.compile(rf"""(\[["']{key}["']\]|\.get\(["']{key}["']|\.{key}\b)""")
    return any(
        pattern.search(path.read_text(encoding="utf-8"))
        for root in roots
        for path in root.rglob("*.py")
        if path.name != skip
    )


def _plugin_keys() -> Iterator[tuple[str, str, list[Path]]]:
    for plugin, section in load_plugins().declared_sections():
        for key in _merged(section.schema):
            roots = _source_of(plugin)
            if key in READ_BY_THE_CORE:
                roots.append(CORE)
            yield section.path, key, roots


def _source_of(plugin: str) -> list[Path]:
    """Where a plugin's code lives, with the code of the plugins it builds on (oidc hands
    its JWT checks to cloudbridge-jwt); the core's own plugins (tls, ice, prometheus) are
    in the core."""
    directory = ROOT / "plugins" / f"cloudbridge-{plugin}"
    if not directory.is_dir():
        return [CORE]
    project = tomllib.loads((directory / "pyproject.toml").read_text(encoding="utf-8"))
    uses = [
        ROOT / "plugins" / dependency / "src"
        for dependency in project["project"]["dependencies"]
        if dependency.startswith("cloudbridge-") and dependency != "cloudbridge-core"
    ]
    return [directory / "src", *uses]


@pytest.mark.parametrize(("section", "key", "roots"), list(_plugin_keys()))
def test_every_plugin_setting_is_read(section: str, key: str, roots: list[Path]) -> None:
    assert _key_readers(key, roots), f"nothing reads {section}.{key}"


def test_settings_hold_converted_values_and_the_schemas_defaults() -> None:
    settings = load_config(None, environ={}).settings
    assert settings.server.handshake_timeout == 10.0
    assert settings.transport.race_head_start == 0.3
    assert settings.retry.per_error["timeout"].initial_delay == 3.0
    assert settings.tunnels == ()


def test_defaults_fill_entries_of_lists_and_maps_too() -> None:
    overrides = {
        "tunnels": ([{"local_port": 8080, "remote_host": "db", "remote_port": 5432}], "test"),
        "server.egress.tenants": ({"acme": {"allow": ["10.0.0.0/8"]}}, "test"),
    }
    settings = load_config(None, environ={}, overrides=overrides).settings
    assert settings.tunnels[0].local_host == "127.0.0.1"
    assert settings.server.egress.tenants["acme"].deny == ()


def test_durations_are_parsed_only_where_the_config_is_converted() -> None:
    allowed = {
        CORE / "durations.py",
        CORE / "settings" / "convert.py",  # config values, converted once
        CORE / "config" / "schema.py",  # minDuration and maxDuration checks
        CORE / "cli" / "params.py",  # flags such as --ttl
        CORE / "relay" / "console" / "actions.py",  # the console's fields such as ttl
    }
    parsing = {
        path
        for root in (CORE, ROOT / "plugins")
        for path in root.rglob("*.py")
        if "tests" not in path.parts and "parse_duration(" in path.read_text(encoding="utf-8")
    }
    assert parsing - allowed == set()
