"""Fresh virtual environments built with uv, apart from the workspace's own."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uv import find_uv_bin

ROOT = Path(__file__).resolve().parents[1]

TAIL_LINES = 40
#: the last lines each started process wrote to stderr, for a failing test's message
OUTPUT_TAILS: weakref.WeakKeyDictionary[subprocess.Popen[str], deque[str]] = (
    weakref.WeakKeyDictionary()
)


def output_tail(process: subprocess.Popen[str]) -> str:
    return "".join(OUTPUT_TAILS.get(process, ()))


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
        return subprocess.run(
            self._command(args),
            capture_output=True,
            text=True,
            cwd=cwd,
            env=self._environment(env),
            check=False,
            timeout=300,
        )

    def start(
        self, *args: str | Path, ready: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start a long-running command from this venv's bin/ and wait until it prints the
        line saying it is ready (on stderr); raises ``RuntimeError`` if it exits first."""
        process = subprocess.Popen(
            self._command(args), stderr=subprocess.PIPE, text=True, env=self._environment(env)
        )
        assert process.stderr is not None
        seen: list[str] = []
        for line in process.stderr:
            if ready in line:
                # keep draining, so that a chatty process never blocks on a full pipe, and
                # keep the last lines for a failing test's message
                OUTPUT_TAILS[process] = tail = deque(seen[-TAIL_LINES:], maxlen=TAIL_LINES)
                threading.Thread(target=tail.extend, args=(process.stderr,), daemon=True).start()
                return process
            seen.append(line)
        process.wait()
        process.stderr.close()
        raise RuntimeError(f"{args[:2]} exited with {process.returncode}:\n{''.join(seen)}")

    def _command(self, args: tuple[str | Path, ...]) -> list[str]:
        return [str(self.path / "bin" / str(args[0])), *map(str, args[1:])]

    @staticmethod
    def _environment(extra: dict[str, str] | None) -> dict[str, str]:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("CLOUDBRIDGE_", "VIRTUAL_ENV"))
        }
        environment.update(extra or {})
        return environment

    def cloudbridge_json(self, *args: str) -> Any:
        result = self.run("cloudbridge", *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def make_venv(path: Path) -> Venv:
    subprocess.run([find_uv_bin(), "venv", "--quiet", "--python", "3.11", str(path)], check=True)
    return Venv(path)
