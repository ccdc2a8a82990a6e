"""The configuration schema: the core's JSON Schema plus the sections plugins contribute.

``schemas/config.schema.json`` at the repository root is the source of truth; the core
wheel carries a byte-identical copy (a test fails if they drift).

Besides standard JSON Schema 2020-12, config schemas (the core's and plugins') may use:

- ``minDuration`` / ``maxDuration``: bounds of a duration string (``"minDuration": "1s"``);
- ``x-cloudbridge-provider``: ``{"family": "transport", "also": ["auto"]}`` marks a value
  naming a provider; :func:`merged_schema` limits it to what this host has;
- ``x-cloudbridge-aliases``: ``{"warn": "warning"}``, spellings read as another value;
- ``x-cloudbridge-messages``: ``{"enum": "{value} is not ..."}``, a failure in words;
- ``"format": "ipv4-network"``: an IPv4 network in CIDR form with no host bits set
  (``100.64.0.0/10``), besides the standard formats.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from cloudbridge_core.durations import DURATION_PATTERN, parse_duration
from cloudbridge_core.providers import ConfigSection

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

    from cloudbridge_core.plugins import Plugins

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


@dataclass(frozen=True)
class ProviderChoices:
    """What a value naming a provider of one family may be on this host.

    ``installed`` are the active providers; ``inactive`` are installed plugins that are
    disabled or failed to load: naming one is not a typo, and the command that needs it
    says how to fix it.
    """

    word: str
    installed: tuple[str, ...]
    inactive: tuple[str, ...] = ()


def provider_choices(plugins: Plugins, words: Mapping[str, str]) -> dict[str, ProviderChoices]:
    """What a value naming a provider may be, for each family in ``words`` (family -> the
    word users know it by, ``plugins.FAMILY_WORDS``), given the loaded plugins."""
    inactive = tuple(record.name for record in plugins.records if record.status != "active")
    return {
        family: ProviderChoices(word, tuple(plugins.providers(family)), inactive)
        for family, word in words.items()
    }


def merged_schema(
    sections: Iterable[ConfigSection], providers: Mapping[str, ProviderChoices] | None = None
) -> Schema:
    """The core schema with each plugin section applied at its dotted path.

    Where the core or another plugin already declares the path (a plugin-owned
    placeholder, ``p2p.ice`` read by two strategies, ``metrics`` read by the built-in
    ``prometheus`` exporter), the fragment joins that node's own ``allOf``: the node keeps
    its properties, so sections declared below it (``metrics.pushgateway``) still become
    properties of the node that closes it. Otherwise it becomes a new property.
    """
    schema = core_schema()
    for section in sections:
        *parents, leaf = section.path.split(".")
        node = schema
        for key in parents:
            node = node.setdefault("properties", {}).setdefault(key, {"type": "object"})
        properties = node.setdefault("properties", {})
        fragment = copy.deepcopy(dict(section.schema))
        existing = properties.get(leaf)
        if existing is None:
            properties[leaf] = fragment
        else:
            properties[leaf] = {**existing, "allOf": [*existing.get("allOf", []), fragment]}
    if providers is not None:
        _limit_to_installed(schema, providers)
    return schema


def _limit_to_installed(node: Schema, providers: Mapping[str, ProviderChoices]) -> None:
    """Give each ``x-cloudbridge-provider`` value an ``enum`` of what may be named here.

    That is the installed providers, the inactive plugins, and any plugin whose section
    sits beside the value (``transport.quic`` beside ``transport.mode``): such a plugin
    exists and is just not installed on this host, which ``config validate`` warns about
    with the package to install, rather than calling it a typo.
    """
    siblings = node.get("properties", {})
    for child in [*siblings.values(), *node.get("allOf", [])]:
        marked = child.get("x-cloudbridge-provider")
        if isinstance(marked, Mapping) and marked.get("family") in providers:
            choices = providers[marked["family"]]
            also = [str(name) for name in marked.get("also", [])]
            known = {name for name in map(_plugin_of, siblings.values()) if name}
            child["enum"] = [*sorted({*choices.installed, *choices.inactive, *known}), *also]
            listed = ", ".join(sorted(choices.installed)) or "none"
            extra = f"; or {', '.join(also)}" if also else ""
            child.setdefault("x-cloudbridge-messages", {})["enum"] = (
                f"{{value}} is not an installed {choices.word} (installed: {listed}{extra})"
            )
        _limit_to_installed(child, providers)


def _plugin_of(node: Mapping[str, Any]) -> str | None:
    """The plugin owning a section placeholder (also once plugins' fragments joined it)."""
    for part in [node, *node.get("allOf", [])]:
        if isinstance(part.get("x-cloudbridge-plugin"), str):
            return str(part["x-cloudbridge-plugin"])
    return None


def described(error: ValidationError) -> str | None:
    """The schema's own words for ``error`` (``x-cloudbridge-messages``), if it has some."""
    failed = error.schema if isinstance(error.schema, Mapping) else {}
    template = failed.get("x-cloudbridge-messages", {}).get(str(error.validator))
    if not isinstance(template, str):
        return None
    message = template.replace("{value}", repr(error.instance))
    if isinstance(error.instance, str) and isinstance(error.validator_value, list):
        choices = [str(choice) for choice in error.validator_value]
        close = difflib.get_close_matches(error.instance, choices, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return message


def aliases(schema: Mapping[str, Any]) -> dict[tuple[str, ...], Mapping[str, str]]:
    """Paths whose values have other accepted spellings (``x-cloudbridge-aliases``)."""
    return {
        path: node["x-cloudbridge-aliases"]
        for path, node in _walk(schema, ())
        if isinstance(node.get("x-cloudbridge-aliases"), Mapping)
    }


Check = Callable[["Validator", Any, Any, Mapping[str, Any]], Iterator[ValidationError]]


def _duration_bound(too: str, bound_name: str, outside: Callable[[float, float], bool]) -> Check:
    def check(
        _validator: Validator, bound: Any, instance: Any, _schema: Mapping[str, Any]
    ) -> Iterator[ValidationError]:
        if not isinstance(instance, str) or not re.fullmatch(DURATION_PATTERN, instance):
            return  # not a duration at all: "$defs/duration" says so
        if outside(parse_duration(instance), parse_duration(bound)):
            yield ValidationError(f"{instance} is too {too}: the {bound_name} is {bound}")

    return check


#: Draft 2020-12 plus bounds on duration strings, which JSON Schema cannot compare
ConfigValidator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]  # jsonschema leaves extend() unannotated
    Draft202012Validator,
    {
        "minDuration": _duration_bound("short", "minimum", lambda value, low: value < low),
        "maxDuration": _duration_bound("long", "maximum", lambda value, high: value > high),
    },
)


_CIDR = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}")


def _ipv4_network(instance: object) -> bool:
    """``100.64.0.0/10``: raises ``ValueError`` for host bits set or a bad address."""
    if not isinstance(instance, str):
        return True  # "type" reports it
    if not _CIDR.fullmatch(instance):
        return False
    ipaddress.IPv4Network(instance)  # strict: host bits set raise ValueError
    return True


#: the standard formats plus CloudBridge's own (``ipv4-network``)
FORMATS = copy.deepcopy(Draft202012Validator.FORMAT_CHECKER)
FORMATS.checks("ipv4-network", raises=ValueError)(_ipv4_network)


def config_validator(schema: Mapping[str, Any]) -> Validator:
    """A validator of config documents: formats checked, duration bounds understood."""
    validator: Validator = ConfigValidator(schema, format_checker=FORMATS)
    return validator


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
