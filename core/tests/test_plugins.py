"""Plugin discovery, failure isolation and selection, with real (fake-installed) plugins."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from cloudbridge_core.client.connection import transport_order
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.errors import ConfigError, PluginSelectionError, ProviderNotInstalled
from cloudbridge_core.p2p.manager import _strategies
from cloudbridge_core.plugins import (
    BUILTINS,
    Plugins,
    PluginSelection,
    load_plugins,
    transport_port,
)
from cloudbridge_core.providers import AuthProviderSpec


def by_name(plugins: Plugins) -> dict[str, dict[str, object]]:
    return {r.name: r.to_dict() for r in plugins.records}


def test_discovers_and_registers_providers_and_sections(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("fast", transport_plugin("fast", priority=50))
    plugins = load_plugins()
    record = by_name(plugins)["fast"]
    assert record["status"] == "active"
    assert record["distribution"] == "cloudbridge-fast"
    assert record["version"] == "1.0"
    assert record["families"] == ["transport"]
    assert record["providers"] == {"transport": ["fast"]}
    assert record["hooks"] == ["cloudbridge_config_schema", "cloudbridge_transports"]
    # the built-in TLS transport is always there, and priority orders the family
    transports = list(plugins.providers("transport"))
    assert transports.index("fast") < transports.index("tls")
    assert "transport.fast" in [s.path for s in plugins.config_sections()]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("raise RuntimeError('boom at import')", "boom at import"),
        ("import cloudbridge_nonexistent_dependency", "cloudbridge_nonexistent_dependency"),
        (
            "from cloudbridge_core.hookspecs import hookimpl\n"
            "@hookimpl\ndef cloudbridge_transports():\n    raise ValueError('bad hook')\n",
            "bad hook",
        ),
        (
            "from cloudbridge_core.hookspecs import hookimpl\n"
            "@hookimpl\ndef cloudbridge_transports():\n    return ['not a spec']\n",
            "not a ProviderSpec",
        ),
        (
            "from cloudbridge_core.hookspecs import hookimpl\n"
            "@hookimpl\ndef cloudbridge_transport_typo():\n    return []\n",
            "cloudbridge_transport_typo",
        ),
        (
            "from cloudbridge_core.hookspecs import hookimpl\n"
            "from cloudbridge_core.providers import ConfigSection\n"
            "@hookimpl\ndef cloudbridge_config_schema():\n"
            "    return [ConfigSection(path='x', schema={'type': 'no-such-type'})]\n",
            "config schema for 'x' is invalid",
        ),
    ],
    ids=[
        "import-raises",
        "missing-dependency",
        "hook-raises",
        "bad-spec",
        "unknown-hook",
        "bad-schema",
    ],
)
def test_broken_plugin_is_recorded_and_others_survive(
    install_plugin: Callable[..., None],
    transport_plugin: Callable[..., str],
    source: str,
    expected: str,
) -> None:
    install_plugin("good", transport_plugin("good"))
    install_plugin("broken", source)
    plugins = load_plugins()
    records = by_name(plugins)
    assert records["good"]["status"] == "active"
    assert records["broken"]["status"] == "failed"
    assert expected in str(records["broken"]["error"])
    assert records["broken"]["providers"] == {}
    assert "good" in plugins.providers("transport")


def test_duplicate_plugin_names_fail_both(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("twin", transport_plugin("twin"), dist="cloudbridge-twin")
    install_plugin("twin", transport_plugin("twin"), dist="other-twin")
    record = by_name(load_plugins())["twin"]
    assert record["status"] == "failed"
    assert "cloudbridge-twin" in str(record["error"])
    assert "other-twin" in str(record["error"])


def test_builtin_name_cannot_be_taken(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("tls", transport_plugin("tls2"), dist="cloudbridge-impostor")
    plugins = load_plugins()
    records = [r.to_dict() for r in plugins.records if r.name == "tls"]
    assert [(r["distribution"], r["status"]) for r in records] == [
        ("cloudbridge-core", "active"),
        ("cloudbridge-impostor", "failed"),
    ]
    assert "taken by a built-in plugin" in str(records[1]["error"])
    assert "tls" in plugins.providers("transport")
    assert "tls2" not in plugins.providers("transport")


def test_provider_name_taken_by_another_plugin(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("mytls", transport_plugin("tls"))
    records = by_name(load_plugins())
    assert records["tls"]["status"] == "active"
    assert records["mytls"]["status"] == "failed"
    assert "transport 'tls' is already provided" in str(records["mytls"]["error"])


def test_selection_allow_and_deny(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("alpha", transport_plugin("alpha"))
    install_plugin("beta", transport_plugin("beta"))
    only_alpha = PluginSelection.from_sources(flag_plugins=["alpha"])
    records = by_name(load_plugins(only_alpha))
    assert (records["alpha"]["status"], records["beta"]["status"]) == ("active", "disabled")
    assert records["tls"]["status"] == "active"  # built-ins are not subject to allow-lists

    env = {"CLOUDBRIDGE_PLUGINS": "beta", "CLOUDBRIDGE_DISABLE_PLUGINS": "tls"}
    records = by_name(load_plugins(PluginSelection.from_sources(env=env, config_enabled=["alpha"])))
    assert (records["alpha"]["status"], records["beta"]["status"]) == ("disabled", "active")
    assert records["tls"]["status"] == "disabled"

    nothing = PluginSelection.from_sources(no_plugins=True, flag_plugins=["alpha"])
    statuses = {n: r["status"] for n, r in by_name(load_plugins(nothing)).items()}
    assert {s for n, s in statuses.items() if n not in BUILTINS} == {"disabled"}
    assert {statuses[n] for n in BUILTINS} == {"active"}  # the core's own plugins stay


def test_disabled_plugin_is_never_imported(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("crashy", "raise SystemExit('imported!')")
    selection = PluginSelection.from_sources(config_disabled=["crashy"])
    assert by_name(load_plugins(selection))["crashy"]["status"] == "disabled"


def test_unknown_name_lists_installed(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("alpha", transport_plugin("alpha"))
    with pytest.raises(PluginSelectionError) as caught:
        load_plugins(PluginSelection.from_sources(env={"CLOUDBRIDGE_PLUGINS": "alpah"}))
    assert "'alpah' (from CLOUDBRIDGE_PLUGINS)" in caught.value.message
    installed = caught.value.message.split("installed plugins: ")[1].split(", ")
    assert {"alpha", "tls"} <= set(installed)


def test_missing_provider_names_the_distribution(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("off", transport_plugin("off"))
    plugins = load_plugins(PluginSelection.from_sources(config_disabled=["off"]))
    with pytest.raises(ProviderNotInstalled, match=r"pip install cloudbridge-carrier-pigeon"):
        plugins.require("transport", "carrier-pigeon")
    with pytest.raises(ProviderNotInstalled, match=r"which is disabled"):
        plugins.require("transport", "off")
    assert plugins.require("transport", "tls").name == "tls"


NAT_PLUGIN = """
from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, NatStrategySpec


@hookimpl
def cloudbridge_nat_strategies():
    # the strategy is the settings it was loaded with: the test sees what it received
    return [NatStrategySpec(name="hopper", load=lambda settings: dict(settings), priority=5)]


@hookimpl
def cloudbridge_config_schema():
    return [
        ConfigSection(
            path="p2p.hopper",
            schema={
                "type": "object",
                "additionalProperties": False,
                "properties": {"hops": {"type": "integer", "default": 3}},
            },
        )
    ]
"""


def sections_plugin(family_hook: str, spec: str, name: str, *paths: str) -> str:
    """A plugin offering provider ``name`` and declaring a section at each of ``paths``."""
    sections = ", ".join(
        f"ConfigSection(path={path!r}, schema={{'type': 'object'}})" for path in paths
    )
    return f"""
from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, {spec}


@hookimpl
def {family_hook}():
    return [{spec}(name={name!r}, load=lambda settings: settings)]


@hookimpl
def cloudbridge_config_schema():
    return [{sections}]
"""


def test_each_provider_is_loaded_with_its_own_plugins_section(
    install_plugin: Callable[..., None],
) -> None:
    install_plugin("hopper", NAT_PLUGIN)
    plugins = load_plugins()
    schema = merged_schema(plugins.config_sections())
    overrides = {
        "p2p.hopper.hops": (5, "test"),
        "p2p.ice.stun_servers": (["stun:stun.example.com:3478"], "test"),
        "p2p.fallback_enabled": (False, "test"),  # no TURN, no DERP: ice and hopper only
    }
    config = load_config(None, environ={}, overrides=overrides, schema=schema)
    # the NAT strategy a plugin like plugin-template's declares gets p2p.hopper, not p2p.ice
    strategies = dict(_strategies(config, plugins, "p2p-first"))
    assert strategies["hopper"] == {"hops": 5}
    assert list(strategies) == ["ice", "hopper"]  # by priority

    def routed(family: str, name: str) -> Mapping[str, Any]:
        return plugins.settings_for(family, name, config.data)

    assert plugins.section_path("nat_strategy", "ice") == "p2p.ice"
    assert routed("nat_strategy", "ice") == config.get("p2p.ice")
    assert plugins.section_path("nat_strategy", "turn") == "p2p.ice"  # its only section
    assert routed("nat_strategy", "derp") == {}  # declares none
    assert routed("transport", "tls")["port"] == 5556
    assert routed("transport", "quic")["port"] == 5553
    assert routed("auth_provider", "jwt") == config.get("auth.jwt")
    assert routed("exporter", "prometheus") == config.get("metrics")
    assert routed("exporter", "pushgateway") == config.get("metrics.pushgateway")
    assert plugins.section_path("transport", "carrier-pigeon") is None
    # the typed accessors return each family, highest priority first: for transports the
    # order of their measured throughput, which auto follows (docs/transports.md)
    assert list(plugins.transports()) == ["tls", "websocket", "grpc", "quic"]
    assert {"jwt", "oidc"} <= set(plugins.auth_providers())
    assert list(plugins.nat_strategies())[:2] == ["ice", "turn"]
    assert list(plugins.overlays()) == ["wireguard"]
    assert {"prometheus", "pushgateway"} <= set(plugins.exporters())


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (
            sections_plugin(
                "cloudbridge_nat_strategies", "NatStrategySpec", "twin", "p2p.left", "p2p.right"
            ),
            "NAT strategy 'twin': its plugin declares the config sections p2p.left, p2p.right"
            " but none at p2p.twin, so which one it reads is ambiguous",
        ),
        (
            sections_plugin("cloudbridge_transports", "TransportSpec", "twin", "transport.other"),
            "transport 'twin': its plugin declares the config sections transport.other but not"
            " transport.twin, where a transport's settings and port live",
        ),
    ],
    ids=["several-sections-none-its-own", "transport-section-elsewhere"],
)
def test_a_plugin_whose_sections_leave_the_route_unclear_fails_to_load(
    install_plugin: Callable[..., None], source: str, error: str
) -> None:
    install_plugin("twin", source)
    record = by_name(load_plugins())["twin"]
    assert record["status"] == "failed"
    assert record["error"] == f"ValueError: {error}"


def test_a_plugin_with_several_sections_routes_the_one_named_after_the_provider(
    install_plugin: Callable[..., None],
) -> None:
    install_plugin(
        "twin",
        sections_plugin(
            "cloudbridge_exporters", "ExporterSpec", "twin", "metrics.shared", "metrics.twin"
        ),
    )
    plugins = load_plugins()
    assert plugins.section_path("exporter", "twin") == "metrics.twin"
    data = {"metrics": {"shared": {"a": 1}, "twin": {"b": 2}}}
    assert plugins.settings_for("exporter", "twin", data) == {"b": 2}


def test_a_transport_without_a_port_is_an_error_naming_the_key(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("portless", transport_plugin("portless"))  # its section has no port
    plugins = load_plugins()
    schema = merged_schema(plugins.config_sections())
    for mode in ("portless", "auto"):
        overrides = {"transport.mode": (mode, "test")}
        config = load_config(None, environ={}, overrides=overrides, schema=schema)
        with pytest.raises(ConfigError) as caught:
            transport_order(config, plugins)
        [issue] = caught.value.issues
        assert issue.path == "transport.portless.port"
        assert issue.message == (
            "transport 'portless' has no port to use: transport.portless.port is not set"
        )
    with pytest.raises(ConfigError, match=r"transport.tls.port is 0, not a port \(1-65535\)"):
        transport_port("tls", {"transport": {"tls": {"port": 0}}})
    assert transport_port("tls", {"transport": {"tls": {"port": 5556}}}) == 5556


def test_a_plain_spec_is_an_auth_provider_without_a_token_source(
    install_plugin: Callable[..., None],
) -> None:
    install_plugin("plain", sections_plugin("cloudbridge_auth_providers", "ProviderSpec", "plain"))
    spec = load_plugins().auth_providers()["plain"]
    assert isinstance(spec, AuthProviderSpec)
    assert spec.token_source is None
