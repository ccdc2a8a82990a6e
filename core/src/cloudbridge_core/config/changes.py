"""What a reload changes: the keys whose values differ, and which of them need a restart.

A key needs a restart when the schema marks it (or a section above it) with
``"x-restart-required": true``: no running component applies it, so a reload logs it
instead of pretending. Plugins mark their own sections' keys the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudbridge_core.config.loader import Config
from cloudbridge_core.config.sources import Path_, dotted, leaves

RESTART_REQUIRED = "x-restart-required"


@dataclass(frozen=True)
class ConfigChanges:
    """The dotted keys that differ between two configs (a list is one key, ``tunnels``)."""

    changed: tuple[str, ...]
    #: the marked keys among ``changed`` (a section's name when the whole section is marked)
    restart_required: tuple[str, ...]

    @classmethod
    def between(cls, before: Config, after: Config) -> ConfigChanges:
        paths = changed_paths(before.data, after.data)
        return cls(
            tuple(dotted(path) for path in paths),
            tuple(restart_required(paths, after.schema)),
        )

    def touches(self, prefix: str) -> bool:
        """Whether a changed key is ``prefix`` or lies under it (``touches("metrics")``)."""
        return any(key == prefix or key.startswith(f"{prefix}.") for key in self.changed)


def changed_paths(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Path_]:
    """The leaves (lists included) whose values differ, or that only one side has."""
    old, new = dict(leaves(before)), dict(leaves(after))
    return sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))


def restart_required(paths: Iterable[Path_], schema: Mapping[str, Any]) -> list[str]:
    """The marked keys that ``paths`` fall under, once each, sorted."""
    found = {_marked_prefix(path, schema) for path in paths}
    return sorted(dotted(prefix) for prefix in found if prefix is not None)


def _marked_prefix(path: Path_, schema: Mapping[str, Any]) -> Path_ | None:
    node: Mapping[str, Any] | None = schema
    for depth in range(len(path) + 1):
        if node is None:
            return None
        if any(part.get(RESTART_REQUIRED) is True for part in _parts(node)):
            return path[:depth]
        node = _child(node, path[depth]) if depth < len(path) else None
    return None


def _parts(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A node and the ``allOf`` fragments plugins add at the same path."""
    return [node, *(p for p in node.get("allOf", []) if isinstance(p, Mapping))]


def _child(node: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    for part in _parts(node):
        properties = part.get("properties", {})
        if key in properties:
            child: Mapping[str, Any] = properties[key]
            return child
    for part in _parts(node):
        for pattern, child in part.get("patternProperties", {}).items():
            if re.search(pattern, key):
                return child
        extra = part.get("additionalProperties")
        if isinstance(extra, Mapping):
            return extra
    return None


def restart_required_set_by(config: Config, source: str) -> list[str]:
    """The marked keys that ``source`` (a file, ``env VAR``, ``flag --x``) sets in ``config``."""
    paths = [path for path, origin in config.origins.items() if origin.source == source]
    return restart_required(paths, config.schema)
