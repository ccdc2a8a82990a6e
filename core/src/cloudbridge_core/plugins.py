"""Plugin discovery, selection and the typed facade over the hooks.

stevedore scans the ``cloudbridge`` entry-point group, loading each selected plugin with
its own failure isolation; every loaded plugin module is registered into pluggy, and this
module is the only one that calls ``pm.hook``. Each plugin's provider hooks are called
once, at load time and one plugin at a time, so a plugin whose hook raises or returns
garbage is recorded as failed instead of breaking everyone else's results.

Settings are routed by one rule (:meth:`Plugins.settings_for`): a provider's ``load``
receives the config section its own plugin declared with ``cloudbridge_config_schema``.
That is the section at ``<family root>.<provider name>`` (``transport.quic``, ``auth.jwt``,
``p2p.turn``, ``metrics.pushgateway``) when the plugin declares it; otherwise the one
section the plugin declares (the built-in ``prometheus`` exporter reads ``metrics``, the
``turn`` strategy ``p2p.ice``); ``{}`` when it declares none. A transport's section is
always ``transport.<name>``, since its ``port`` is written there (``relay serve``'s
client.yaml, ``join``, ``init``). A plugin whose sections leave a provider's unclear
(several, none at that path; a transport's elsewhere) fails to load, with the reason.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import pluggy
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from stevedore import NamedExtensionManager

from cloudbridge_core import __version__, builtin, hookspecs, prometheus
from cloudbridge_core.errors import (
    ConfigError,
    ConfigIssue,
    PluginSelectionError,
    ProviderNotInstalled,
)
from cloudbridge_core.p2p import nat
from cloudbridge_core.providers import (
    AuthProviderSpec,
    ConfigSection,
    ExporterSpec,
    NatStrategySpec,
    OverlaySpec,
    ProviderSpec,
    TransportSpec,
)

if TYPE_CHECKING:
    import click
    from stevedore.extension import ExtensionManager

ENTRY_POINT_GROUP = "cloudbridge"
CORE_DISTRIBUTION = "cloudbridge-core"

#: hook name -> provider family, in the order families are listed
PROVIDER_HOOKS: dict[str, str] = {
    "cloudbridge_transports": "transport",
    "cloudbridge_auth_providers": "auth_provider",
    "cloudbridge_nat_strategies": "nat_strategy",
    "cloudbridge_overlays": "overlay",
    "cloudbridge_exporters": "exporter",
}
#: provider family -> the config section its plugins' sections live under
FAMILY_ROOTS = {
    "transport": "transport",
    "auth_provider": "auth",
    "nat_strategy": "p2p",
    "overlay": "overlay",
    "exporter": "metrics",
}
FAMILY_WORDS = {
    "transport": "transport",
    "auth_provider": "auth provider",
    "nat_strategy": "NAT strategy",
    "overlay": "overlay",
    "exporter": "exporter",
}

#: Plugins the core registers itself; they are active unless disabled by name.
BUILTINS: Mapping[str, ModuleType] = {"tls": builtin, "prometheus": prometheus, "ice": nat}

Status = Literal["active", "disabled", "failed"]


@dataclass
class PluginRecord:
    """What ``cloudbridge plugins list`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    status: Status = "active"
    error: str | None = None
    builtin: bool = False
    providers: dict[str, list[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)

    @property
    def families(self) -> list[str]:
        return [family for family in PROVIDER_HOOKS.values() if self.providers.get(family)]

    def fail(self, error: str) -> None:
        self.status = "failed"
        self.error = error
        self.providers = {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "builtin": self.builtin,
            "families": self.families,
            "providers": {family: names for family, names in self.providers.items() if names},
            "hooks": self.hooks,
        }


@dataclass(frozen=True)
class PluginSelection:
    """Which installed plugins to load.

    ``allow`` of ``None`` means every installed plugin; built-in plugins are only
    affected by ``deny``. ``explicit`` are names the user asked for by name, whose
    failure is an error rather than a line in ``plugins list``.
    """

    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    explicit: frozenset[str] = frozenset()
    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_sources(
        cls,
        *,
        flag_plugins: Sequence[str] = (),
        no_plugins: bool = False,
        env: Mapping[str, str] | None = None,
        config_enabled: Sequence[str] | None = None,
        config_disabled: Sequence[str] = (),
    ) -> PluginSelection:
        """Combine flags > environment > config for the allow-list; deny lists add up."""
        env = env or {}
        sources: dict[str, str] = {}
        allow: frozenset[str] | None = None
        explicit: frozenset[str] = frozenset()
        if no_plugins:
            allow = frozenset()
        elif flag_plugins:
            allow = explicit = frozenset(flag_plugins)
            sources.update(dict.fromkeys(flag_plugins, "--plugin"))
        elif "CLOUDBRIDGE_PLUGINS" in env:
            allow = explicit = frozenset(_split_names(env["CLOUDBRIDGE_PLUGINS"]))
            sources.update(dict.fromkeys(allow, "CLOUDBRIDGE_PLUGINS"))
        elif config_enabled is not None:
            allow = frozenset(config_enabled)
            sources.update(dict.fromkeys(allow, "plugins.enabled"))
        env_deny = _split_names(env.get("CLOUDBRIDGE_DISABLE_PLUGINS", ""))
        sources.update(dict.fromkeys(env_deny, "CLOUDBRIDGE_DISABLE_PLUGINS"))
        sources.update(dict.fromkeys(config_disabled, "plugins.disabled"))
        deny = frozenset(env_deny) | frozenset(config_disabled)
        return cls(allow=allow, deny=deny, explicit=explicit, sources=sources)

    def check_known(self, installed: Iterable[str]) -> None:
        """Raise an error naming any unknown plugin and the installed ones.

        Names from the config file are config errors (exit 3), others usage errors (exit 2).
        """
        known = set(installed)
        named = (self.allow or frozenset()) | self.deny
        unknown = sorted(named - known)
        if not unknown:
            return
        listing = f"installed plugins: {', '.join(sorted(known)) or 'none'}"
        hint = "run 'cloudbridge plugins list' to see what is installed"
        in_config = [n for n in unknown if self.sources.get(n, "").startswith("plugins.")]
        if in_config:
            raise ConfigError(
                [
                    ConfigIssue(self.sources[n], f"unknown plugin {n!r}; {listing}")
                    for n in in_config
                ],
                hint=hint,
            )
        where = ", ".join(f"{name!r} (from {self.sources.get(name, '?')})" for name in unknown)
        raise PluginSelectionError(f"unknown plugin {where}; {listing}", hint=hint)

    def wants(self, name: str, *, is_builtin: bool) -> bool:
        if name in self.deny:
            return False
        return is_builtin or self.allow is None or name in self.allow


class Plugins:
    """The loaded plugins and a typed view of everything their hooks returned."""

    def __init__(
        self,
        manager: pluggy.PluginManager,
        records: list[PluginRecord],
        specs: dict[str, dict[str, ProviderSpec[Any]]],
        sections: list[tuple[str, ConfigSection]],
        explicit: frozenset[str],
        routes: Mapping[tuple[str, str], str | None],
    ) -> None:
        self._manager = manager
        self._records = records
        self._specs = specs
        self._sections = sections
        self._explicit = explicit
        self._routes = routes

    @property
    def records(self) -> list[PluginRecord]:
        return list(self._records)

    def providers(self, family: str) -> dict[str, ProviderSpec[Any]]:
        """Active providers of one family by name, highest priority first."""
        found = self._specs.get(family, {})
        return dict(sorted(found.items(), key=lambda item: -item[1].priority))

    def transports(self) -> dict[str, TransportSpec]:
        """Active transports by name, highest priority first."""
        return self.providers("transport")

    def auth_providers(self) -> dict[str, AuthProviderSpec]:
        """Active auth providers by name (every one an :class:`AuthProviderSpec`)."""
        found = self.providers("auth_provider")
        return {name: spec for name, spec in found.items() if isinstance(spec, AuthProviderSpec)}

    def nat_strategies(self) -> dict[str, NatStrategySpec]:
        """Active NAT strategies by name, highest priority (tried first) first."""
        return self.providers("nat_strategy")

    def overlays(self) -> dict[str, OverlaySpec]:
        """Active overlays by name, highest priority first."""
        return self.providers("overlay")

    def exporters(self) -> dict[str, ExporterSpec]:
        """Active exporters by name, highest priority first."""
        return self.providers("exporter")

    def section_path(self, family: str, name: str) -> str | None:
        """The dotted path of the config section routed to provider ``name`` (the rule is
        in this module's docstring); ``None`` when its plugin declares no section."""
        return self._routes.get((family, name))

    def settings_for(
        self, family: str, name: str, config_data: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """What provider ``name``'s ``load`` receives: the value in ``config_data`` at the
        section its own plugin declared, ``{}`` when it declared none."""
        path = self.section_path(family, name)
        if path is None:
            return {}
        value: Any = config_data
        for key in path.split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        return value if isinstance(value, Mapping) else {}

    def require(self, family: str, name: str) -> ProviderSpec[Any]:
        """Return the active provider ``name`` or raise an error that names the fix."""
        spec = self._specs.get(family, {}).get(name)
        if spec is not None:
            return spec
        word = FAMILY_WORDS[family]
        record = next((r for r in self._records if r.name == name), None)
        if record is not None and record.status == "disabled":
            raise ProviderNotInstalled(
                f"{word} {name!r} comes from plugin {name!r}, which is disabled",
                hint="remove it from plugins.disabled / CLOUDBRIDGE_DISABLE_PLUGINS",
            )
        if record is not None and record.status == "failed":
            raise ProviderNotInstalled(
                f"{word} {name!r} comes from plugin {name!r}, which failed to load: {record.error}",
                hint=f"reinstall it: pip install --force-reinstall {record.distribution}",
            )
        available = ", ".join(self._specs.get(family, {})) or "none"
        distribution = f"cloudbridge-{name.replace('_', '-')}"
        raise ProviderNotInstalled(
            f"{word} {name!r} is not installed: pip install {distribution}"
            f" (available: {available})",
            hint=f"pip install {distribution}",
        )

    def config_sections(self) -> list[ConfigSection]:
        return [section for _, section in self._sections]

    def declared_sections(self) -> list[tuple[str, ConfigSection]]:
        """Each config section with the name of the plugin that declared it."""
        return list(self._sections)

    def failed_explicit(self) -> list[PluginRecord]:
        """Plugins the user selected by name that failed to load."""
        return [r for r in self._records if r.name in self._explicit and r.status == "failed"]

    def add_commands(self, cli: click.Group, on_error: Callable[[str, Exception], None]) -> None:
        """Let every active plugin add its commands; a plugin that raises is skipped."""
        for record in self._records:
            plugin = self._manager.get_plugin(record.name)
            if plugin is None:
                continue
            try:
                _call_one(self._manager, plugin, "cloudbridge_commands", cli=cli)
            except Exception as exc:  # noqa: BLE001 - a plugin's bug must not break the CLI
                on_error(record.name, exc)


def load_plugins(
    selection: PluginSelection | None = None,
    *,
    group: str = ENTRY_POINT_GROUP,
    builtins: Mapping[str, ModuleType] = BUILTINS,
) -> Plugins:
    """Discover, select, load and register plugins; never raises for a plugin's fault.

    Raises :class:`PluginSelectionError` when the selection names an unknown plugin.
    """
    selection = selection or PluginSelection()
    entry_points = _entry_points_by_name(group)
    selection.check_known([*entry_points, *builtins])

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    records: dict[str, PluginRecord] = {}
    for name, module in builtins.items():
        record = PluginRecord(name, CORE_DISTRIBUTION, __version__, builtin=True)
        records[name] = record
        if selection.wants(name, is_builtin=True):
            _register(manager, record, module)
        else:
            record.status = "disabled"

    to_load = []
    for name, candidates in entry_points.items():
        dist, version = candidates[0]
        if name in builtins:  # a built-in keeps its name; the newcomer is listed as failed
            clash = records[f"{name} ({dist})"] = PluginRecord(name, dist, version)
            clash.fail(f"plugin name {name!r} is taken by a built-in plugin of {CORE_DISTRIBUTION}")
            continue
        record = records[name] = PluginRecord(name, dist, version)
        if len(candidates) > 1:
            owners = [owner for owner, _ in candidates]
            record.fail(f"plugin name {name!r} is provided by several distributions: {owners}")
        elif not selection.wants(name, is_builtin=False):
            record.status = "disabled"
        else:
            to_load.append(name)

    def on_failure(_manager: ExtensionManager[Any], ep: Any, error: BaseException) -> None:
        records[ep.name].fail(f"failed to load: {type(error).__name__}: {error}")

    extensions = NamedExtensionManager(
        group,
        names=to_load,
        on_load_failure_callback=on_failure,
        on_missing_entrypoints_callback=None,
    )
    for extension in extensions:
        _register(manager, records[extension.name], extension.plugin)

    ordered = sorted(records.values(), key=lambda r: (not r.builtin, r.name))
    specs, sections, routes = _collect(manager, ordered)
    return Plugins(manager, ordered, specs, sections, selection.explicit, routes)


def transport_port(name: str, config_data: Mapping[str, Any]) -> int:
    """The relay's port for transport ``name``: ``transport.<name>.port``, in the transport's
    own section. Raises :class:`ConfigError` naming that key when it holds no port."""
    key = f"transport.{name}.port"
    section = config_data.get("transport", {}).get(name)
    port = section.get("port") if isinstance(section, Mapping) else None
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return port
    problem = "is not set" if port is None else f"is {port!r}, not a port (1-65535)"
    raise ConfigError(
        [ConfigIssue(key, f"transport {name!r} has no port to use: {key} {problem}")],
        hint=f"set {key}, or disable the plugin that offers {name!r}"
        " (a transport plugin's config schema declares port, with a default)",
    )


def _split_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _entry_points_by_name(group: str) -> dict[str, list[tuple[str, str]]]:
    """Entry-point name -> [(distribution, version)], one item per distinct distribution."""
    found: dict[str, list[tuple[str, str]]] = {}
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist
        owner = (dist.name, dist.version) if dist is not None else ("unknown", "0")
        if owner not in found.setdefault(ep.name, []):
            found[ep.name].append(owner)
    return found


def _register(manager: pluggy.PluginManager, record: PluginRecord, module: object) -> None:
    try:
        manager.register(module, name=record.name)
    except Exception as exc:  # noqa: BLE001 - pluggy validation errors and plugin bugs alike
        record.fail(f"invalid hook implementation: {exc}")
        return
    callers = manager.get_hookcallers(module) or []
    unknown = sorted(caller.name for caller in callers if caller.spec is None)
    if unknown:
        manager.unregister(module)
        record.fail(f"implements unknown hooks {unknown} (misspelt, or for a newer core?)")
        return
    record.hooks = sorted(caller.name for caller in callers)


def _call_one(manager: pluggy.PluginManager, plugin: object, hook: str, **kwargs: Any) -> Any:
    """Call one plugin's implementation of ``hook`` through pluggy."""
    others = [p for p in manager.get_plugins() if p is not plugin]
    return manager.subset_hook_caller(hook, remove_plugins=others)(**kwargs)


def _collect(
    manager: pluggy.PluginManager, records: list[PluginRecord]
) -> tuple[
    dict[str, dict[str, ProviderSpec[Any]]],
    list[tuple[str, ConfigSection]],
    dict[tuple[str, str], str | None],
]:
    specs: dict[str, dict[str, ProviderSpec[Any]]] = {f: {} for f in PROVIDER_HOOKS.values()}
    sections: list[tuple[str, ConfigSection]] = []
    routes: dict[tuple[str, str], str | None] = {}
    for record in records:
        plugin = manager.get_plugin(record.name)
        if plugin is None or record.status != "active":
            continue
        try:
            provided = _provided_by(manager, plugin, specs)
            own_sections = _sections_of(manager, plugin)
            paths = [section.path for section in own_sections]
            own_routes = {
                (family, name): _route(family, name, paths)
                for family, found in provided.items()
                for name in found
            }
        except Exception as exc:  # noqa: BLE001 - isolate one plugin's bug from the others
            record.fail(f"{type(exc).__name__}: {exc}")
            manager.unregister(plugin)
            continue
        record.providers = {family: sorted(found) for family, found in provided.items()}
        for family, found in provided.items():
            specs[family].update(found)
        sections.extend((record.name, section) for section in own_sections)
        routes.update(own_routes)
    return specs, sections, routes


def _route(family: str, name: str, paths: list[str]) -> str | None:
    """The section of its plugin's ``paths`` that provider ``name`` of ``family`` receives."""
    own = f"{FAMILY_ROOTS[family]}.{name}"
    if not paths:
        return None
    if own in paths:
        return own
    if family == "transport":
        raise ValueError(
            f"transport {name!r}: its plugin declares the config sections {', '.join(paths)}"
            f" but not {own}, where a transport's settings and port live"
        )
    if len(paths) == 1:
        return paths[0]
    raise ValueError(
        f"{FAMILY_WORDS[family]} {name!r}: its plugin declares the config sections"
        f" {', '.join(paths)} but none at {own}, so which one it reads is ambiguous"
    )


def _provided_by(
    manager: pluggy.PluginManager,
    plugin: object,
    taken: Mapping[str, Mapping[str, ProviderSpec[Any]]],
) -> dict[str, dict[str, ProviderSpec[Any]]]:
    provided: dict[str, dict[str, ProviderSpec[Any]]] = {}
    for hook, family in PROVIDER_HOOKS.items():
        for result in _call_one(manager, plugin, hook):
            for spec in result:
                if not isinstance(spec, ProviderSpec) or not isinstance(spec.name, str):
                    raise TypeError(f"{hook} returned {spec!r}, not a ProviderSpec")
                if spec.name in taken[family] or spec.name in provided.get(family, {}):
                    word = FAMILY_WORDS[family]
                    raise ValueError(f"{word} {spec.name!r} is already provided by another plugin")
                provided.setdefault(family, {})[spec.name] = _typed(family, spec)
    return provided


def _typed(family: str, spec: ProviderSpec[Any]) -> ProviderSpec[Any]:
    if family == "auth_provider" and not isinstance(spec, AuthProviderSpec):
        # a plain ProviderSpec is an auth provider without a client-side token source
        return AuthProviderSpec(spec.name, spec.load, spec.priority, spec.description)
    return spec


def _sections_of(manager: pluggy.PluginManager, plugin: object) -> list[ConfigSection]:
    sections: list[ConfigSection] = []
    for result in _call_one(manager, plugin, "cloudbridge_config_schema"):
        for section in result:
            if not isinstance(section, ConfigSection):
                raise TypeError(f"cloudbridge_config_schema returned {section!r}")
            try:
                Draft202012Validator.check_schema(dict(section.schema))
            except SchemaError as exc:
                raise ValueError(
                    f"config schema for {section.path!r} is invalid: {exc.message}"
                ) from None
            sections.append(section)
    return sections
