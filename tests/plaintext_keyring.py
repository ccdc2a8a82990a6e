"""A keyring backend that keeps passwords in a plaintext file, as keyrings.alt's
``PlaintextKeyring`` does (same priority: 0.5, "not recommended"); selected in a CLI
process with ``PYTHON_KEYRING_BACKEND=plaintext_keyring.PlaintextKeyring`` and this
directory on ``PYTHONPATH``. The file is ``$PLAINTEXT_KEYRING_FILE``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend


class PlaintextKeyring(KeyringBackend):
    priority = 0.5  # type: ignore[assignment]  # keyring declares a classproperty

    @property
    def _file(self) -> Path:
        return Path(os.environ["PLAINTEXT_KEYRING_FILE"])

    def _entries(self) -> dict[str, str]:
        try:
            entries: dict[str, str] = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        return entries

    def get_password(self, service: str, username: str) -> str | None:
        return self._entries().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        self._file.write_text(json.dumps({**self._entries(), f"{service}/{username}": password}))

    def delete_password(self, service: str, username: str) -> None:
        entries = self._entries()
        entries.pop(f"{service}/{username}", None)
        self._file.write_text(json.dumps(entries))
