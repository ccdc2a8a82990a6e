"""Loading the effective configuration: defaults < YAML file < environment < flags."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import platformdirs
from jsonschema.exceptions import ValidationError, best_match

from cloudbridge_core.config import paths, sources
from cloudbridge_core.config.schema import (
    Schema,
    aliases,
    config_validator,
    core_schema,
    defaults,
    described,
    secret_paths,
)
from cloudbridge_core.config.sources import Layer, Mark, Origin, Path_, dotted, leaves
from cloudbridge_core.durations import DURATION_PATTERN, invalid_duration
from cloudbridge_core.errors import ConfigError, ConfigIssue
from cloudbridge_core.settings import Settings, build, convert

SYSTEM_CONFIG = Path("/etc/cloudbridge/config.yaml")
REDACTED = "<redacted>"
_T = TypeVar("_T")


def search_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: ``--config``, ``CLOUDBRIDGE_CONFIG``, user dir, /etc.

    An explicitly named file that does not exist is an error; the others are optional.
    """
    named = explicit or environ.get("CLOUDBRIDGE_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            where = "--config" if explicit else "CLOUDBRIDGE_CONFIG"
            raise ConfigError([ConfigIssue("", f"config file not found ({where})", str(path))])
        return path
    for candidate in searched():
        if candidate.is_file():
            return candidate
    return None


def searched() -> list[Path]:
    """Where a config file is looked for when none is named, first found first."""
    return [platformdirs.user_config_path("cloudbridge") / "config.yaml", SYSTEM_CONFIG]


@dataclass(frozen=True)
class Config:
    """A validated, effective configuration and where each of its values came from."""

    data: Mapping[str, Any]
    source: Path | None
    origins: Mapping[Path_, Origin] = field(repr=False)
    secrets: frozenset[Path_] = field(repr=False)
    schema: Schema = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def converted(self) -> Mapping[str, Any]:
        """The data with every value converted by its schema type (durations in seconds)."""
        converted: Mapping[str, Any] = convert(self.data, self.schema, self.schema)
        return converted

    @cached_property
    def settings(self) -> Settings:
        """The core's sections, typed; components take their own (``settings.relay``)."""
        return build(Settings, self.converted)

    def section(self, path: str) -> Mapping[str, Any]:
        """The converted value at a dotted path (a plugin's own section); ``{}`` if absent."""
        value: Any = self.converted
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value if isinstance(value, Mapping) else {}

    def get(self, key: str) -> Any:
        """The value at a dotted path (``transport.quic.port``); ``KeyError`` if absent."""
        value: Any = self.data
        for part in key.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        return value

    def origin(self, path: Path_) -> Origin:
        return _longest_prefix(self.origins, path) or Origin("default")

    def redacted(self) -> dict[str, Any]:
        """The data with every secret replaced by ``<redacted>`` (for display and logs)."""
        redacted: dict[str, Any] = _redact(self.data, (), self.secrets)
        return redacted

    def with_origins(self) -> list[dict[str, Any]]:
        """Every leaf as ``{"key", "value", "origin"}``, secrets redacted."""
        return [
            {"key": dotted(path), "value": value, "origin": str(self.origin(path))}
            for path, value in leaves(self.redacted())
        ]


@dataclass
class RawConfig:
    """Every source read and merged, not yet validated."""

    data: dict[str, Any]
    source: Path | None
    origins: dict[Path_, Origin]
    marks: dict[Path_, Mark]
    issues: list[ConfigIssue]


def read_sources(
    path: Path | None,
    *,
    environ: Mapping[str, str],
    overrides: Mapping[str, tuple[Any, str]] | None = None,
    schema: Schema | None = None,
) -> RawConfig:
    """Read and merge every source; never raises for a problem in the sources."""
    schema = schema or core_schema()
    layers = [Layer(name="defaults", data=defaults(schema))]  # origin "default" is implied
    if path is not None:
        layers.append(sources.file_layer(path, environ))
    layers.append(sources.env_layer(environ, schema))
    layers.append(sources.overrides_layer(overrides or {}))
    data: dict[str, Any] = {}
    origins: dict[Path_, Origin] = {}
    marks: dict[Path_, Mark] = {}
    issues: list[ConfigIssue] = []
    for layer in layers:
        data = sources.merge(data, layer.data)
        for changed, _ in leaves(layer.data):
            if not changed:  # an empty layer changes nothing
                continue
            for old in [p for p in origins if p[: len(changed)] == changed]:
                del origins[old]
        origins.update(layer.origins)
        marks.update(layer.marks)
        issues.extend(layer.issues)
    _unalias(data, schema)
    data = paths.absolute_paths(data, origins, path, schema)
    return RawConfig(data, path, origins, marks, issues)


def _unalias(data: dict[str, Any], schema: Schema) -> None:
    """Read another accepted spelling (``logging.level: warn``) as the one everything uses."""
    for path, spellings in aliases(schema).items():
        parent: Any = data
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        value = parent.get(path[-1]) if isinstance(parent, dict) else None
        if isinstance(value, str) and value in spellings:
            parent[path[-1]] = spellings[value]


def validate(raw: RawConfig, schema: Schema) -> Config:
    """Check ``raw`` against ``schema``; raise :class:`ConfigError` listing every problem."""
    secrets = frozenset(secret_paths(schema))
    issues = list(raw.issues)
    # a value already reported while reading (an unset ${VAR}) would only be reported again
    reported = {issue.path for issue in raw.issues}
    for error in config_validator(schema).iter_errors(raw.data):
        found = _issues_from(error, raw, secrets)
        issues.extend(issue for issue in found if issue.path not in reported)
    issues.extend(_located(p, m, raw) for p, m in paths.settle_paths(raw, schema))
    if issues:
        issues.sort(key=lambda i: (i.line is None, i.line or 0, i.column or 0, i.path))
        raise ConfigError(issues, hint="run 'cloudbridge config validate' to see every error")
    return Config(raw.data, raw.source, raw.origins, secrets, schema)


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
    schema: Schema | None = None,
) -> Config:
    """Read every source and validate the result against ``schema`` (default: the core's)."""
    environ = os.environ if environ is None else environ
    schema = schema or core_schema()
    return validate(read_sources(path, environ=environ, overrides=overrides, schema=schema), schema)


def _issues_from(
    error: ValidationError, raw: RawConfig, secrets: frozenset[Path_]
) -> list[ConfigIssue]:
    path = tuple(str(p) for p in error.absolute_path)
    failed_schema = error.schema
    if (
        error.validator == "additionalProperties"
        and isinstance(error.instance, dict)
        and isinstance(failed_schema, Mapping)
    ):
        known = list(failed_schema.get("properties", {}))
        patterns = list(failed_schema.get("patternProperties", {}))
        extras = [
            k
            for k in error.instance
            if k not in known and not any(re.search(p, k) for p in patterns)
        ]
        return [_unknown_key(path, key, known, raw) for key in extras]
    if error.context:
        error = best_match(error.context)
        path = tuple(str(p) for p in error.absolute_path)
    message = described(error) or _duration_message(error) or error.message
    if _is_secret(path, secrets):
        message = f"invalid value (fails '{error.validator}'; the value is a secret and not shown)"
    return [_located(path, message, raw)]


def _duration_message(error: ValidationError) -> str | None:
    """Explain a malformed duration in words instead of printing ``$defs/duration``'s regex."""
    failed = error.schema if isinstance(error.schema, Mapping) else {}
    if failed.get("pattern") == DURATION_PATTERN and error.validator in ("pattern", "type"):
        return invalid_duration(error.instance)
    return None


def _unknown_key(parent: Path_, key: str, known: Sequence[str], raw: RawConfig) -> ConfigIssue:
    message = f"unknown key {key!r}"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    elif known:
        message += f" (allowed: {', '.join(known)})"
    return _located((*parent, key), message, raw)


def _located(path: Path_, message: str, raw: RawConfig) -> ConfigIssue:
    # origins are kept per leaf: a mapping (an unknown section) came from where its leaves did
    origin = _longest_prefix(raw.origins, path) or next(
        (o for p, o in raw.origins.items() if path and p[: len(path)] == path), None
    )
    if origin is None:
        return ConfigIssue(dotted(path), message, "default")
    mark = _longest_prefix(raw.marks, path) if origin.line is not None else None
    if mark is None:
        return ConfigIssue(dotted(path), message, origin.source)
    return ConfigIssue(dotted(path), message, origin.source, mark.line, mark.column)


def _longest_prefix(found: Mapping[Path_, _T], path: Path_) -> _T | None:
    for end in range(len(path), 0, -1):
        if path[:end] in found:
            return found[path[:end]]
    return None


def _is_secret(path: Path_, secrets: frozenset[Path_]) -> bool:
    return any(
        len(secret) == len(path) and all(s in ("*", p) for s, p in zip(secret, path, strict=True))
        for secret in secrets
    )


def _redact(value: Any, path: Path_, secrets: frozenset[Path_]) -> Any:
    if _is_secret(path, secrets) and value is not None:
        return REDACTED
    if isinstance(value, Mapping):
        return {k: _redact(v, (*path, str(k)), secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, (*path, str(i)), secrets) for i, v in enumerate(value)]
    return value
