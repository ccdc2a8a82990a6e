"""Reading configuration sources: YAML files with line numbers, ``${VAR}``, environment.

Each source becomes a :class:`Layer`: nested data plus, for every value it sets, where
that value came from. Nothing here validates; problems found while reading (bad YAML,
duplicate keys, unset variables) are collected as :class:`ConfigIssue` objects so that
``config validate`` can report all of them at once.

A config file is read with bounds, because it may come from elsewhere (a shared
template, a config-management run): at most ``MAX_CONFIG_BYTES``, nested at most
``MAX_CONFIG_DEPTH`` deep, and at most ``MAX_CONFIG_NODES`` values once YAML aliases are
expanded, so a "billion laughs" file is refused in milliseconds with a config error
instead of eating memory and CPU in every walk over the data. These are security limits;
they bound the reading of the config itself, so no config key can set them.
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

#: largest config file read, in bytes (a security limit)
MAX_CONFIG_BYTES = 1024 * 1024
#: deepest nesting of mappings and lists in a config file (a security limit)
MAX_CONFIG_DEPTH = 64
#: most values a config file may hold with its aliases expanded (a security limit)
MAX_CONFIG_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than ``MAX_CONFIG_DEPTH`` as it
    composes (its composer recurses: a deep file would otherwise end in RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]  # stubs lack it
                raise yaml.composer.ComposerError(
                    problem=f"nested deeper than {MAX_CONFIG_DEPTH} levels (a security limit)",
                    problem_mark=event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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
    parsed = _parse(path)
    if isinstance(parsed, ConfigIssue):
        layer.issues.append(parsed)
        return layer
    node, data = parsed
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


def _parse(path: Path) -> tuple[yaml.Node | None, Any] | ConfigIssue:
    """The file's YAML node tree and data, read within the bounds, or what is wrong."""
    source = str(path)
    try:
        with path.open("rb") as file:  # never more than the limit in memory
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return ConfigIssue("", f"cannot read file: {exc.strerror}", source)
    if len(raw) > MAX_CONFIG_BYTES:
        return ConfigIssue(
            "", f"the file is larger than {MAX_CONFIG_BYTES} bytes (a security limit)", source
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ConfigIssue("", f"not UTF-8 text: {exc.reason}", source)
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_CONFIG_NODES:
            mark = Mark.of(node.start_mark)
            message = (
                f"holds more than {MAX_CONFIG_NODES} values once its aliases are expanded"
                " (a security limit against alias bombs)"
            )
            return ConfigIssue("", message, source, mark.line, mark.column)
        return node, loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as exc:
        return _yaml_issue(exc, source)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded, counted without
    expanding: an aliased node's size is computed once (the composer shares it)."""
    sizes: dict[int, int] = {}
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    while pending:  # iterative, children first: nesting is bounded, but cheaply so
        node, children_done = pending.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_CONFIG_NODES + 1)
            continue
        pending.append((node, True))
        pending.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


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
    except (ValueError, RecursionError):  # deeply nested JSON is no value of ours either
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
