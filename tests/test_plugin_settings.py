"""Every plugin reads the section the core hands its provider: validated, every default from
the plugin's schema, durations already in seconds (no plugin parses them again)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.providers import AuthProviderSpec
from cloudbridge_core.settings import build
from cloudbridge_core.testing.settings import plugin_settings
from cloudbridge_grpc.hooks import SETTINGS_SCHEMA as GRPC_SCHEMA
from cloudbridge_grpc.transport import GrpcSettings
from cloudbridge_jwt.hooks import SETTINGS_SCHEMA as JWT_SCHEMA
from cloudbridge_jwt.validator import JwtSettings
from cloudbridge_oidc.hooks import SETTINGS_SCHEMA as OIDC_SCHEMA
from cloudbridge_oidc.settings import OidcSettings
from cloudbridge_pushgateway.exporter import PushgatewaySettings
from cloudbridge_pushgateway.hooks import SETTINGS_SCHEMA as PUSHGATEWAY_SCHEMA
from cloudbridge_quic.hooks import SETTINGS_SCHEMA as QUIC_SCHEMA
from cloudbridge_quic.transport import QuicSettings
from cloudbridge_websocket.hooks import SETTINGS_SCHEMA as WEBSOCKET_SCHEMA
from cloudbridge_websocket.transport import WebSocketSettings

SETTINGS_CLASSES = [
    (QuicSettings, QUIC_SCHEMA),
    (GrpcSettings, GRPC_SCHEMA),
    (WebSocketSettings, WEBSOCKET_SCHEMA),
    (JwtSettings, JWT_SCHEMA),
    (OidcSettings, OIDC_SCHEMA),
    (PushgatewaySettings, PUSHGATEWAY_SCHEMA),
]


def _optional(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


@pytest.mark.parametrize(
    ("cls", "schema"), SETTINGS_CLASSES, ids=[cls.__name__ for cls, _ in SETTINGS_CLASSES]
)
def test_each_settings_class_takes_its_defaults_from_the_schema(
    cls: type[Any], schema: dict[str, Any]
) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        assert field.name in schema["properties"], f"{cls.__name__}.{field.name}: no such key"
        assert field.default is dataclasses.MISSING, f"{cls.__name__}.{field.name}: a default"
        assert field.default_factory is dataclasses.MISSING
    built = build(cls, plugin_settings(schema))
    unset = [
        f.name
        for f in dataclasses.fields(cls)
        if getattr(built, f.name) is None and not _optional(hints[f.name])
    ]
    assert unset == [], f"{cls.__name__}: the schema gives these no default"


CONFIG = """\
transport:
  quic: {idle_timeout: 45s}
  grpc: {keepalive_interval: 1m}
  websocket: {ping_interval: 500ms}
auth:
  jwt: {jwks_url: "https://idp.example.com/jwks", audience: relay, leeway: 1m}
  oidc: {issuer: "https://idp.example.com", audience: relay, jwks_cache_ttl: 2h}
metrics:
  pushgateway: {push_interval: 1m30s}
p2p:
  ice:
    turn_servers: [{url: "turn:127.0.0.1:3478", username: u, credential: c}]
"""


def test_each_provider_loads_the_section_the_core_converts(tmp_path: Path) -> None:
    plugins = load_plugins()
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    config = load_config(path, environ={}, schema=merged_schema(plugins.config_sections()))

    def loaded(family: str, name: str, section: str) -> Any:
        return plugins.require(family, name).load(config.section(section))

    assert loaded("transport", "quic", "transport.quic").settings.idle_timeout == 45.0
    assert loaded("transport", "grpc", "transport.grpc").settings.keepalive_interval == 60.0
    assert loaded("transport", "websocket", "transport.websocket").settings.ping_interval == 0.5
    assert loaded("auth_provider", "jwt", "auth.jwt").settings.leeway == 60.0
    assert loaded("auth_provider", "oidc", "auth.oidc").settings.jwks_cache_ttl == 7200.0
    oidc = plugins.require("auth_provider", "oidc")
    assert isinstance(oidc, AuthProviderSpec)
    assert oidc.token_source is not None
    client: Any = oidc.token_source(config.section("auth.oidc"))
    assert client.settings.scopes == ("openid", "offline_access")
    pushgateway = loaded("exporter", "pushgateway", "metrics.pushgateway")
    assert pushgateway.settings.push_interval == 90.0
    assert loaded("nat_strategy", "turn", "p2p.ice")._servers[0].port == 3478
