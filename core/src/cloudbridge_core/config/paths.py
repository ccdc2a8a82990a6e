"""Paths in the configuration: where a relative one points, and whether it names a usable file.

The schema marks a path with ``"x-cloudbridge-path"``, in the core's sections and in
plugins' alike (``jsonschema`` ignores the keyword)::

    "file"      a file CloudBridge reads (a CA, a key): it must exist and be readable
    "dir"       a directory CloudBridge reads: it must exist
    "new-file"  a file CloudBridge writes (a log, a kept token), created when missing
    "new-dir"   a directory CloudBridge creates, with its parents, when missing

``"x-cloudbridge-path-except"`` lists values that are words, not paths (``logging.output``'s
``stderr`` and ``stdout``).

A relative path in the config file is relative to that file's directory, so the file means
the same from any working directory (a service runs from ``/``); one from the environment
or a flag is relative to the working directory when the config is loaded, as on a command
line. ``~`` is the user's home. After loading, every path is absolute.
"""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudbridge_core.config.sources import Origin, Path_, dotted

if TYPE_CHECKING:
    from cloudbridge_core.config.loader import RawConfig

KEYWORD = "x-cloudbridge-path"
EXCEPT = "x-cloudbridge-path-except"
#: what reading a path of a kind needs, and the words when it is refused
_ACCESS = {
    "file": (os.R_OK, "cannot be read (permission denied)"),
    "dir": (os.R_OK | os.X_OK, "cannot be listed (permission denied)"),
}


@dataclass(frozen=True)
class PathKey:
    """A key whose value is a path; ``*`` in ``path`` stands for any list index."""

    path: Path_
    kind: str
    words: frozenset[str] = frozenset()

    def holds_path(self, value: object) -> bool:
        return isinstance(value, str) and bool(value) and value not in self.words


def path_keys(schema: Mapping[str, Any]) -> list[PathKey]:
    """Every key the schema marks as a path (plugin sections merged in with ``allOf``)."""
    found = []
    stack: list[tuple[Path_, Mapping[str, Any]]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if KEYWORD in node:
            found.append(PathKey(path, str(node[KEYWORD]), frozenset(node.get(EXCEPT, ()))))
        stack.extend((path, part) for part in node.get("allOf", []))
        stack.extend(((*path, key), child) for key, child in node.get("properties", {}).items())
        if isinstance(node.get("items"), Mapping):
            stack.append(((*path, "*"), node["items"]))
    return found


def absolute_paths(
    data: Mapping[str, Any],
    origins: Mapping[Path_, Origin],
    source: Path | None,
    schema: Mapping[str, Any],
) -> dict[str, Any]:
    """A copy of ``data`` whose path values are absolute.

    A value from ``source`` (the config file) is resolved against the file's directory;
    any other (environment, flags, defaults) against the current working directory.
    """
    resolved: dict[str, Any] = copy.deepcopy(dict(data))
    in_file = str(source) if source is not None else None  # the origin of the file's values
    file_dir = os.path.dirname(os.path.abspath(in_file)) if in_file is not None else ""
    for key in path_keys(schema):
        for path, value in _values(resolved, key.path):
            if not key.holds_path(value):
                continue
            origin = _origin(origins, path)
            base = file_dir if origin is not None and origin.source == in_file else os.getcwd()
            _put(resolved, path, os.path.abspath(os.path.join(base, os.path.expanduser(value))))
    return resolved


def settle_paths(raw: RawConfig, schema: Mapping[str, Any]) -> list[tuple[Path_, str]]:
    """Make ``raw``'s paths absolute for ``schema``; each path that names nothing usable,
    with what is wrong (``"/etc/ca.pem does not exist"``), for the loader to locate.

    ``schema`` may declare more paths than the one the sources were read with (plugins'
    sections), so they are resolved again here, in place: resolving is idempotent. A value
    already reported while reading (an unset ``${VAR}``) is not reported again.
    """
    raw.data = absolute_paths(raw.data, raw.origins, raw.source, schema)
    reported = {issue.path for issue in raw.issues}
    problems = []
    for key in path_keys(schema):
        for path, value in _values(raw.data, key.path):
            problem = _problem(value, key.kind) if key.holds_path(value) else None
            if problem is not None and dotted(path) not in reported:
                problems.append((path, f"{value} {problem}"))
    return problems


def _problem(path: str, kind: str) -> str | None:
    """What is wrong with ``path`` for a key of ``kind``, or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if kind in ("file", "dir") else None
    except OSError as exc:
        return f"cannot be reached ({exc.strerror})"
    wants_dir = kind in ("dir", "new-dir")
    if stat.S_ISDIR(mode) != wants_dir:
        return "is not a directory" if wants_dir else "is a directory, not a file"
    needs, refusal = _ACCESS.get(kind, (os.F_OK, ""))
    return refusal if not os.access(path, needs) else None


def _values(data: Any, pattern: Path_, prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """The values at ``pattern`` in ``data``, each with its concrete path."""
    if not pattern:
        yield prefix, data
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*" and isinstance(data, list):
        for index, item in enumerate(data):
            yield from _values(item, rest, (*prefix, str(index)))
    elif isinstance(data, Mapping) and head in data:
        yield from _values(data[head], rest, (*prefix, head))


def _put(data: Any, path: Path_, value: str) -> None:
    for key in path[:-1]:
        data = data[int(key)] if isinstance(data, list) else data[key]
    if isinstance(data, list):
        data[int(path[-1])] = value
    else:
        data[path[-1]] = value


def _origin(origins: Mapping[Path_, Origin], path: Path_) -> Origin | None:
    """Where the value at ``path`` came from (a list's items share the list's origin)."""
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]]
    return None
