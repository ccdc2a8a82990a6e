"""The configuration schema: the core's JSON Schema plus the sections plugins contribute.

``schemas/config.schema.json`` at the repository root is the source of truth; the core
wheel carries a byte-identical copy (a test fails if they drift).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any

from cloudbridge_core.providers import ConfigSection

Schema = dict[str, Any]


@cache
def _core_schema_text() -> str:
    return (resources.files("cloudbridge_core") / "schemas" / "config.schema.json").read_text(
        encoding="utf-8"
    )


def core_schema() -> Schema:
    """A fresh copy of the core's config schema."""
    loaded: Schema = json.loads(_core_schema_text())
    return loaded


def cli_schema(name: str) -> Schema:
    """The JSON Schema of a CLI command's ``--json`` output (``plugins-list``, ...)."""
    text = resources.files("cloudbridge_core") / "schemas" / "cli" / f"{name}.schema.json"
    loaded: Schema = json.loads(text.read_text(encoding="utf-8"))
    return loaded


def merged_schema(sections: Iterable[ConfigSection]) -> Schema:
    """The core schema with each plugin section applied at its dotted path.

    Where the core already declares the path (a plugin-owned placeholder), the plugin's
    fragment is added with ``allOf``; otherwise it becomes a new property.
    """
    schema = core_schema()
    for section in sections:
        *parents, leaf = section.path.split(".")
        node = schema
        for key in parents:
            node = node.setdefault("properties", {}).setdefault(key, {"type": "object"})
        properties = node.setdefault("properties", {})
        fragment = copy.deepcopy(dict(section.schema))
        if leaf in properties:
            properties[leaf] = {"allOf": [properties[leaf], fragment]}
        else:
            properties[leaf] = fragment
    return schema


def _walk(
    schema: Mapping[str, Any], path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
    yield path, schema
    for part in schema.get("allOf", []):
        yield from _walk(part, path)
    for key, child in schema.get("properties", {}).items():
        yield from _walk(child, (*path, key))


def defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The default config: every leaf's ``default``, nested under its parents."""
    result: dict[str, Any] = {}
    for path, node in _walk(schema, ()):
        if path and "default" in node:
            target = result
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target.setdefault(path[-1], copy.deepcopy(node["default"]))
    return result


def secret_paths(schema: Mapping[str, Any]) -> set[tuple[str, ...]]:
    """Paths whose values are secrets (``writeOnly`` in the schema); ``*`` matches any index."""
    found = set()
    stack: list[tuple[tuple[str, ...], Mapping[str, Any]]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if node.get("writeOnly"):
            found.add(path)
        stack.extend((path, part) for part in node.get("allOf", []))
        stack.extend(((*path, key), child) for key, child in node.get("properties", {}).items())
        if isinstance(node.get("items"), Mapping):
            stack.append(((*path, "*"), node["items"]))
    return found


def node_at(schema: Mapping[str, Any], path: Iterable[str]) -> Mapping[str, Any] | None:
    """The sub-schema describing ``path`` (``None`` when the schema does not declare it)."""
    node: Mapping[str, Any] = schema
    for key in path:
        candidates = [node, *node.get("allOf", [])]
        child = next(
            (c["properties"][key] for c in candidates if key in c.get("properties", {})), None
        )
        if child is None:
            return None
        node = child
    return node


def types_at(schema: Mapping[str, Any], path: Iterable[str]) -> set[str]:
    """The JSON types the schema allows at ``path``, following local ``$ref``s."""
    node = node_at(schema, path)
    if node is None:
        return set()
    while "$ref" in node and str(node["$ref"]).startswith("#/$defs/"):
        node = schema["$defs"][str(node["$ref"]).removeprefix("#/$defs/")]
    declared = node.get("type", [])
    types = {declared} if isinstance(declared, str) else set(declared)
    for option in node.get("anyOf", []) + node.get("oneOf", []):
        if "$ref" in option:
            types |= types_at({**schema, "properties": {"x": option}}, ["x"])
        elif "type" in option:
            types |= {option["type"]} if isinstance(option["type"], str) else set(option["type"])
    return types
