"""Where a client keeps its token: the OS keyring (Secret Service, Keychain, Credential
Manager), or — only when the user says so — a 0600 file. Without a keyring the client
fails closed rather than writing a secret to disk on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keyring
import keyring.errors
from keyring.backends import fail

from cloudbridge_core.errors import AuthError
from cloudbridge_core.secretfile import write_secret


def keyring_available() -> bool:
    backend = keyring.get_keyring()
    return not isinstance(backend, fail.Keyring) and backend.priority > 0


def store_token(
    token: str, *, service: str, account: str, directory: Path, insecure: bool
) -> dict[str, Any]:
    """Keep ``token``; returns the ``auth`` settings that find it again."""
    if insecure:
        path = directory / "token"
        write_secret(path, token.encode())
        return {"token_storage": "file", "token_file": str(path)}
    if not keyring_available():
        raise AuthError(
            "no OS keyring is available here to keep the token",
            hint="pass --insecure-storage to keep it in a 0600 file instead",
        )
    keyring.set_password(service, account, token)
    return {"token_storage": "keyring", "keyring_service": service}


def stored_token(auth: dict[str, Any], account: str) -> str | None:
    """The token kept by ``store_token``, if any (a missing keyring means none)."""
    if auth.get("token_storage") == "file" and auth.get("token_file"):
        try:
            return Path(auth["token_file"]).read_text().strip() or None
        except FileNotFoundError:
            return None
    try:
        return keyring.get_password(auth.get("keyring_service") or "cloudbridge", account)
    except keyring.errors.KeyringError:
        return None
