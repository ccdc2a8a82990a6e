"""The hooks a CloudBridge plugin can implement.

A plugin is a module named by an entry point in the ``cloudbridge`` group; it implements
any of these functions, decorated with :data:`hookimpl`. Hooks are synchronous factories:
they do no I/O and import nothing heavy, they return :class:`ProviderSpec` records whose
``load`` does the real work later. All results are collected; the core chooses among
them by name and ``priority``, never by the order pluggy happens to call them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from cloudbridge_core.providers import (
        AuthProviderSpec,
        ConfigSection,
        ExporterSpec,
        NatStrategySpec,
        OverlaySpec,
        TransportSpec,
    )

PROJECT = "cloudbridge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cloudbridge_transports() -> Sequence[TransportSpec]:
    """Return the transports this plugin offers.

    Example::

        @hookimpl
        def cloudbridge_transports():
            def load(settings):
                from cloudbridge_quic.transport import QuicTransport  # heavy: aioquic

                return QuicTransport(settings)

            return [TransportSpec(name="quic", load=load, priority=10)]
    """
    raise AssertionError("hookspec bodies never run")


@hookspec
def cloudbridge_auth_providers() -> Sequence[AuthProviderSpec]:
    """Return the token validators this plugin offers.

    Example::

        @hookimpl
        def cloudbridge_auth_providers():
            def load(settings):
                from cloudbridge_jwt.validator import JwtValidator

                return JwtValidator(settings)

            return [AuthProviderSpec(name="jwt", load=load)]
    """
    raise AssertionError("hookspec bodies never run")


@hookspec
def cloudbridge_nat_strategies() -> Sequence[NatStrategySpec]:
    """Return the NAT traversal strategies this plugin offers; higher ``priority`` runs first.

    Example::

        @hookimpl
        def cloudbridge_nat_strategies():
            def load(settings):
                from cloudbridge_turn.strategy import TurnStrategy  # heavy: aioice

                return TurnStrategy(settings)

            return [NatStrategySpec(name="turn", load=load, priority=20)]
    """
    raise AssertionError("hookspec bodies never run")


@hookspec
def cloudbridge_overlays() -> Sequence[OverlaySpec]:
    """Return the L3 overlays this plugin offers.

    Example::

        @hookimpl
        def cloudbridge_overlays():
            def load(settings):
                from cloudbridge_wireguard.overlay import WireGuardOverlay

                return WireGuardOverlay(settings)

            return [OverlaySpec(name="wireguard", load=load)]
    """
    raise AssertionError("hookspec bodies never run")


@hookspec
def cloudbridge_exporters() -> Sequence[ExporterSpec]:
    """Return the metrics exporters this plugin offers.

    Example::

        @hookimpl
        def cloudbridge_exporters():
            def load(settings):
                from cloudbridge_pushgateway.exporter import PushgatewayExporter

                return PushgatewayExporter(settings)

            return [ExporterSpec(name="pushgateway", load=load)]
    """
    raise AssertionError("hookspec bodies never run")


@hookspec
def cloudbridge_config_schema() -> Sequence[ConfigSection]:
    """Return the JSON Schema of this plugin's own configuration sections.

    Example::

        @hookimpl
        def cloudbridge_config_schema():
            return [
                ConfigSection(
                    path="transport.quic",
                    schema={
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"max_idle_timeout": {"$ref": "#/$defs/duration"}},
                    },
                )
            ]

    Fragments may refer to the core schema's ``$defs`` (``duration``, ``port``, ...).
    """
    raise AssertionError("hookspec bodies never run")


@hookspec
def cloudbridge_commands(cli: click.Group) -> None:
    """Add click commands to the ``cloudbridge`` command group.

    Example::

        @hookimpl
        def cloudbridge_commands(cli):
            @cli.group()
            def wireguard():
                "Manage the WireGuard overlay."
    """
    raise AssertionError("hookspec bodies never run")
