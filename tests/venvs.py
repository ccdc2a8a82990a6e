"""Fresh virtual environments built with uv, apart from the workspace's own."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uv import find_uv_bin

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Venv:
    """A fresh virtual environment, apart from the workspace's."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def install(self, *requirements: str | Path) -> None:
        subprocess.run(
            [
                find_uv_bin(),
                "pip",
                "install",
                "--quiet",
                "--python",
                str(self.python),
                *map(str, requirements),
            ],
            check=True,
        )

    def run(
        self, *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command from this venv's bin/ (``cloudbridge``, ``python``)."""
        command = [str(self.path / "bin" / str(args[0])), *map(str, args[1:])]
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("CLOUDBRIDGE_", "VIRTUAL_ENV"))
        }
        environment.update(env or {})
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=environment,
            check=False,
            timeout=300,
        )

    def cloudbridge_json(self, *args: str) -> Any:
        result = self.run("cloudbridge", *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def make_venv(path: Path) -> Venv:
    subprocess.run([find_uv_bin(), "venv", "--quiet", "--python", "3.11", str(path)], check=True)
    return Venv(path)
