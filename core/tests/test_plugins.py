"""Plugin discovery, failure isolation and selection, with real (fake-installed) plugins."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cloudbridge_core.errors import PluginSelectionError, ProviderNotInstalled
from cloudbridge_core.plugins import BUILTINS, Plugins, PluginSelection, load_plugins


def by_name(plugins: Plugins) -> dict[str, dict[str, object]]:
    return {r.name: r.to_dict() for r in plugins.records}


def test_discovers_and_registers_providers_and_sections(
    install_plugin: Callable[..., None], transport_plugin: Callable[..., str]
) -> None:
    install_plugin("fast", transport_plugin("fast", priority=30))
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
