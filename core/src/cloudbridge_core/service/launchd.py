"""A launchd job for the client on macOS (label ``com.cloudbridge.client``)."""

from __future__ import annotations

import plistlib
from pathlib import Path

from cloudbridge_core.config import Config
from cloudbridge_core.service.command import client_command

LABEL = "com.cloudbridge.client"


def render_plist(config: Config, config_path: Path, executable: Path, logs: Path) -> bytes:
    job = {
        "Label": LABEL,
        "ProgramArguments": [
            *(str(executable), client_command(config)),
            *("--config", str(config_path.resolve())),
        ],
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False} if config.settings.service.auto_restart else False,
        "ThrottleInterval": 5,
        "StandardOutPath": str(logs / "cloudbridge.out.log"),
        "StandardErrorPath": str(logs / "cloudbridge.err.log"),
        "ProcessType": "Background",
    }
    return plistlib.dumps(job)
