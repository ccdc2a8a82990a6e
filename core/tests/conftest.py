"""Fixtures for the core's tests: fake installed plugins and an in-process CLI runner."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.cli.main import cli, run
from stevedore.extension import ExtensionManager


@pytest.fixture
def install_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., None]]:
    """Make a plugin distribution importable and discoverable, as pip would.

    Writes a real ``.dist-info`` (METADATA + entry_points.txt) and the plugin's module
    into a directory put on ``sys.path``: importlib.metadata and stevedore find it
    exactly as they find an installed wheel.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    modules: list[str] = []

    def install(name: str, source: str, *, dist: str | None = None, version: str = "1.0") -> None:
        dist = dist or f"cloudbridge-{name}"
        package = f"{dist.replace('-', '_')}_pkg"
        (site / package).mkdir(exist_ok=True)
        (site / package / "__init__.py").write_text("")
        (site / package / "hooks.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[cloudbridge]\n{name} = {package}.hooks\n")
        modules.append(package)

    yield install
    for package in modules:
        for loaded in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[loaded]


TRANSPORT_PLUGIN = """
from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import ConfigSection, TransportSpec


@hookimpl
def cloudbridge_transports():
    return [TransportSpec(name="{name}", load=lambda settings: object(), priority={priority})]


@hookimpl
def cloudbridge_config_schema():
    return [
        ConfigSection(
            path="transport.{name}",
            schema={{
                "type": "object",
                "additionalProperties": False,
                "properties": {{"window": {{"type": "integer", "default": 7}}}},
            }},
        )
    ]
"""


@pytest.fixture
def transport_plugin() -> Callable[..., str]:
    """Source of a plugin offering transport ``name`` with a config section of its own."""

    def source(name: str, priority: int = 20) -> str:
        return TRANSPORT_PLUGIN.format(name=name, priority=priority)

    return source


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cloudbridge(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., Result]:
    """Run the real ``cloudbridge`` command in-process, as a user would from a shell."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for variable in ("CLOUDBRIDGE_CONFIG", "CLOUDBRIDGE_PLUGINS", "CLOUDBRIDGE_DISABLE_PLUGINS"):
        monkeypatch.delenv(variable, raising=False)

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        code = run(cli, list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
