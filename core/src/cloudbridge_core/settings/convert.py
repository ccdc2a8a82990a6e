"""Converting validated config data once, by what the schema says each value is.

Durations (``$ref: #/$defs/duration``) become float seconds; everything else keeps its
JSON type. A key left out of an object takes its schema default here too, also inside
lists and maps (a ``tunnels`` entry, a tenant's egress rules), which the top-level
defaults cannot reach. The walk follows ``properties``, ``patternProperties``,
``additionalProperties``, ``items`` and ``allOf`` (plugin fragments merged at a core
path), so a plugin's own section is converted by the same rule as the core's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cloudbridge_core.durations import parse_duration

DURATION_REF = "#/$defs/duration"


def convert(value: Any, node: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """``value`` (already valid against ``node``) with every duration in seconds."""
    if isinstance(value, str) and _is_duration(node, root):
        return parse_duration(value)
    if isinstance(value, Mapping):
        converted = {
            key: convert(item, _child(node, key, root), root) for key, item in value.items()
        }
        for key, child in _merged(node, root)["properties"].items():
            if key not in converted and "default" in child:
                converted[key] = convert(child["default"], child, root)
        return converted
    if isinstance(value, list):
        items = _merged(node, root).get("items")
        item_node = items if isinstance(items, Mapping) else {}
        return [convert(item, item_node, root) for item in value]
    return value


def _is_duration(node: Mapping[str, Any], root: Mapping[str, Any]) -> bool:
    options = [node, *node.get("allOf", []), *node.get("anyOf", []), *node.get("oneOf", [])]
    if any(option.get("$ref") == DURATION_REF for option in options):
        return True
    ref = node.get("$ref")
    return isinstance(ref, str) and _is_duration(_resolve(ref, root), root)


def _child(node: Mapping[str, Any], key: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    merged = _merged(node, root)
    properties: dict[str, Mapping[str, Any]] = merged["properties"]
    if key in properties:
        return properties[key]
    patterns: dict[str, Mapping[str, Any]] = merged["patternProperties"]
    for pattern, child in patterns.items():
        if re.search(pattern, key):
            return child
    extra = merged["additionalProperties"]
    return extra if isinstance(extra, Mapping) else {}


def _merged(node: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """One node's keywords with those of its ``allOf`` parts and local ``$ref``s folded in."""
    merged: dict[str, Any] = {"properties": {}, "patternProperties": {}}
    merged["additionalProperties"] = None
    parts = [node]
    while parts:
        part = parts.pop()
        ref = part.get("$ref")
        if isinstance(ref, str):
            parts.append(_resolve(ref, root))
        parts.extend(part.get("allOf", []))
        for key, child in part.get("properties", {}).items():
            existing = merged["properties"].get(key)
            merged["properties"][key] = {"allOf": [existing, child]} if existing else child
        merged["patternProperties"].update(part.get("patternProperties", {}))
        if isinstance(part.get("additionalProperties"), Mapping):
            merged["additionalProperties"] = part["additionalProperties"]
        if "items" in part:
            merged["items"] = part["items"]
    return merged


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        return {}
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}
