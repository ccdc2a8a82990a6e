"""Plugins use the core through cloudbridge_core.api only: one surface that stays stable."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudbridge_core import api

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_CODE = [
    *sorted((ROOT / "plugins").glob("cloudbridge-*/src")),
    ROOT / "plugin-template" / "template" / "src",
]


IMPORT = re.compile(r"^\s*(?:from|import) (cloudbridge_core[\w.]*)", re.MULTILINE)


def _core_imports(path: Path) -> set[str]:
    """The core modules a source (or a template of one) imports."""
    return set(IMPORT.findall(path.read_text(encoding="utf-8")))


def _sources() -> Iterator[Path]:
    for root in PLUGIN_CODE:
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".jinja") and "_generated" not in path.parts:
                yield path


@pytest.mark.parametrize("path", list(_sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_code_imports_only_the_api(path: Path) -> None:
    assert _core_imports(path) <= {"cloudbridge_core.api"}


def test_every_name_the_api_offers_resolves() -> None:
    for name in api.__all__:
        assert getattr(api, name) is not None, name


def test_importing_the_api_imports_nothing_heavy() -> None:
    code = (
        "import sys, cloudbridge_core.api\n"
        "heavy = ('aioice', 'cryptography', 'tenacity', 'cloudbridge_core.transports.tls')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
