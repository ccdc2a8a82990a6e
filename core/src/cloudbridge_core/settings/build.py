"""Building typed settings from converted config data, by the dataclasses' type hints."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cloudbridge_core.settings.sections import (
    AuthSettings,
    LoggingSettings,
    MetricsSettings,
    OverlaySettings,
    P2PSettings,
    PerformanceSettings,
    PluginsSettings,
    RelaySettings,
    RetrySettings,
    ServerSettings,
    ServiceSettings,
    TransportSettings,
    TunnelSettings,
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every core section of one effective configuration, typed."""

    relay: RelaySettings
    auth: AuthSettings
    p2p: P2PSettings
    overlay: OverlaySettings
    transport: TransportSettings
    tunnels: tuple[TunnelSettings, ...]
    metrics: MetricsSettings
    logging: LoggingSettings
    performance: PerformanceSettings
    service: ServiceSettings
    retry: RetrySettings
    server: ServerSettings
    plugins: PluginsSettings


def build(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """An instance of the dataclass ``cls`` from ``data``; keys without a field are left
    to their owners (plugin sections). A key the schema did not default is ``None``."""
    hints = typing.get_type_hints(cls)
    values = {
        field.name: _value(hints[field.name], data.get(field.name))
        for field in dataclasses.fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _value(inner, value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_value(item, v) for v in value)
    if origin is dict:
        item = typing.get_args(hint)[1]
        return {k: _value(item, v) for k, v in value.items()}
    return value
