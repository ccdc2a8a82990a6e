"""Reading configuration sources: YAML files with line numbers, ``${VAR}``, environment.

Each source becomes a :class:`Layer`: nested data plus, for every value it sets, where
that value came from. Nothing here validates; problems found while reading (bad YAML,
duplicate keys, unset variables) are collected as :class:`ConfigIssue` objects so that
``config validate`` can report all of them at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudbridge_core.config.schema import Schema, types_at
from cloudbridge_core.errors import ConfigIssue

ENV_PREFIX = "CLOUDBRIDGE_"
#: PyYAML's names for what an unclosed quote or bracket leaves open, in a user's words
_UNCLOSED = {
    "quoted scalar": "a quoted string",
    "flow sequence": "a [...] list",
    "flow mapping": "a {...} mapping",
}
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Path_ = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a value came from: a file (with its line), ``env VAR``, ``flag --x`` or ``default``."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


@dataclass(frozen=True, slots=True)
class Mark:
    """A place in a file, counted from 1 as editors do."""

    line: int
    column: int

    @classmethod
    def of(cls, mark: yaml.Mark) -> Mark:
        return cls(mark.line + 1, mark.column + 1)


@dataclass
class Layer:
    """One configuration source: its data and where each value in it came from."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[Path_, Origin] = field(default_factory=dict)
    marks: dict[Path_, Mark] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)


def dotted(path: Path_) -> str:
    return ".".join(path)


def leaves(data: Any, prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every leaf of nested mappings; lists count as leaves (they replace, never merge)."""
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            yield from leaves(value, (*prefix, str(key)))
    else:
        yield prefix, data


def file_layer(path: Path, environ: Mapping[str, str]) -> Layer:
    """Read a YAML config file, interpolating ``${VAR}`` from ``environ``."""
    layer = Layer(name=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        layer.issues.append(ConfigIssue("", f"cannot read file: {exc.strerror}", str(path)))
        return layer
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as exc:
        layer.issues.append(_yaml_issue(exc, str(path)))
        return layer
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        layer.issues.append(
            ConfigIssue("", "the file must hold a mapping of sections", str(path), 1)
        )
        return layer
    if node is not None:
        _index_marks(node, (), layer, str(path))
    layer.data = _interpolate(data, (), environ, layer, str(path))
    for leaf, _ in leaves(layer.data):
        layer.origins[leaf] = Origin(str(path), line_of(layer.marks, leaf))
    return layer


def line_of(marks: Mapping[Path_, Mark], path: Path_) -> int | None:
    mark = marks.get(path)
    return mark.line if mark is not None else None


def _yaml_issue(exc: yaml.YAMLError, source: str) -> ConfigIssue:
    """Locate a YAML error where the problem starts, not where PyYAML gave up.

    An unclosed quote or bracket is only noticed lines later (often at the end of the
    file): PyYAML's ``context_mark`` is where the unclosed scalar or flow collection
    starts, which is where the fix goes. For other errors (a bad indent inside a block
    mapping) the context is merely the enclosing mapping, and ``problem_mark`` is the spot.
    """
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None) or ""
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    unclosed = next((words for kind, words in _UNCLOSED.items() if kind in context), None)
    if unclosed is not None and context_mark is not None:
        where = Mark.of(context_mark)
        noticed = f" at line {problem_mark.line + 1}" if problem_mark is not None else ""
        message = f"invalid YAML: {unclosed} starts here and is not closed ({problem}{noticed})"
        return ConfigIssue("", message, source, where.line, where.column)
    if problem_mark is None:
        return ConfigIssue("", f"invalid YAML: {problem}", source)
    where = Mark.of(problem_mark)
    return ConfigIssue("", f"invalid YAML: {problem}", source, where.line, where.column)


def _index_marks(node: yaml.Node, path: Path_, layer: Layer, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*path, key)
            mark = Mark.of(key_node.start_mark)
            if key in seen:
                layer.issues.append(
                    ConfigIssue(dotted(child), "duplicate key", source, mark.line, mark.column)
                )
            seen.add(key)
            layer.marks[child] = mark
            _index_marks(value_node, child, layer, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, str(index))
            layer.marks[child] = Mark.of(item.start_mark)
            _index_marks(item, child, layer, source)


def _interpolate(
    value: Any, path: Path_, environ: Mapping[str, str], layer: Layer, source: str
) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, (*path, str(k)), environ, layer, source) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, (*path, str(i)), environ, layer, source) for i, v in enumerate(value)
        ]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # "$$" is a literal dollar sign
            return "$"
        if name not in environ:
            mark = layer.marks.get(path)
            layer.issues.append(
                ConfigIssue(
                    dotted(path),
                    f"environment variable {name} is not set (referenced as ${{{name}}})",
                    source,
                    mark.line if mark is not None else None,
                    mark.column if mark is not None else None,
                )
            )
            return ""
        return environ[name]

    return _VARIABLE.sub(substitute, value)


def env_layer(environ: Mapping[str, str], schema: Schema) -> Layer:
    """``CLOUDBRIDGE_SECTION__KEY=value`` overrides, typed by the schema at that path."""
    layer = Layer(name="environment")
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue
        path = tuple(part.lower() for part in variable[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            layer.issues.append(
                ConfigIssue("", f"{variable}: empty key between '__' separators", variable)
            )
            continue
        value = coerce(environ[variable], types_at(schema, path))
        set_path(layer.data, path, value)
        layer.origins[path] = Origin(f"env {variable}")
    return layer


def overrides_layer(overrides: Mapping[str, tuple[Any, str]]) -> Layer:
    """Values set by command-line flags: dotted path -> (value, flag name)."""
    layer = Layer(name="flags")
    for key, (value, flag) in overrides.items():
        path = tuple(key.split("."))
        set_path(layer.data, path, value)
        layer.origins[path] = Origin(f"flag {flag}")
    return layer


def coerce(text: str, types: set[str]) -> Any:
    """Turn an environment string into the type the schema expects there.

    The text is read as JSON (``5553``, ``true``, ``["a"]``, ``null``); when that is not a
    type the schema allows at the path, the raw string is kept and validation reports it.
    """
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if _json_types(value) & types else text


def _json_types(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    kinds = {float: "number", str: "string", list: "array", dict: "object", type(None): "null"}
    return {kinds[type(value)]}


def set_path(data: dict[str, Any], path: Path_, value: Any) -> None:
    target = data
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; anything else in ``top`` (lists included) replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
