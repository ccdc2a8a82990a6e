"""Where a client keeps its token: the OS keyring (Secret Service, Keychain, Credential
Manager), or — only when the user says so — a 0600 file. Without a keyring the client
fails closed rather than writing a secret to disk on its own.

A token given explicitly (``--token-file``, ``--token-stdin``, ``auth.token``,
``CLOUDBRIDGE_TOKEN``) wins over the stored one; an auth provider that is also a
:class:`~cloudbridge_core.providers.TokenSource` (OIDC) renews the stored one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudbridge_core.errors import AuthError, ConfigError, ConfigIssue, Unauthorized
from cloudbridge_core.providers import TokenSource
from cloudbridge_core.secretfile import write_secret
from cloudbridge_core.settings import AuthSettings

if TYPE_CHECKING:
    from cloudbridge_core.config import Config
    from cloudbridge_core.plugins import Plugins

ONBOARDING_HINT = (
    "join with an invite ('cloudbridge join URL'), log in ('cloudbridge login' with auth.type"
    " oidc), or pass --token-file / --token-stdin / CLOUDBRIDGE_TOKEN"
)


#: the claim the relay's own tokens (and the jwt provider's default mapping) list permissions in
PERMISSIONS_CLAIM = "custom:permissions"


def _segment(text: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def token_claims(token: str) -> dict[str, Any] | None:
    """The token's claims when it is a JWT (read, not verified: the relay verifies it)."""
    try:
        claims = _segment(token.split(".")[1])
    except (IndexError, TypeError, ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_problem(token: str) -> str | None:
    """Why ``token`` is not a JWT (three base64url parts, JSON header and claims), or None."""
    parts = token.split(".")
    if len(parts) != 3:  # header, claims, signature
        return f"a JWT has three dot-separated parts, this has {len(parts)}"
    for name, part in zip(("header", "claims"), parts, strict=False):
        try:
            decoded = _segment(part)
        except (TypeError, ValueError, binascii.Error):
            return f"its {name} part is not base64url-encoded JSON"
        if not isinstance(decoded, dict):
            return f"its {name} part is not a JSON object"
    return None


def token_permissions(token: str) -> frozenset[str] | None:
    """The permissions the token lists, or None when it lists none this client can read (an
    opaque token, or a provider mapping them from another claim): then only the relay knows."""
    claims = token_claims(token)
    listed = claims.get(PERMISSIONS_CLAIM) if claims is not None else None
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        return None
    return frozenset(listed)


def missing_permission(token: str, permission: str) -> str | None:
    """A message when the token surely lacks ``permission``, else None."""
    granted = token_permissions(token)
    if granted is None or permission in granted:
        return None
    held = ", ".join(sorted(granted)) or "none"
    return f"the token lacks the {permission} permission (it has: {held})"


def require_permission(token: str, permission: str, needed_for: str) -> None:
    """Raise ``Unauthorized`` (exit 4) before connecting when the token surely lacks
    ``permission`` (the relay would refuse ``needed_for`` anyway, stream by stream)."""
    lacking = missing_permission(token, permission)
    if lacking:
        raise Unauthorized(
            f"{lacking}, which {needed_for} needs",
            hint=f"ask for a token with --permission {permission}"
            " (cloudbridge relay token issue on the relay)",
        )


def token_exp(token: str) -> float | None:
    """The token's ``exp``, seconds since the epoch (read, not verified: the relay verifies it)."""
    claims = token_claims(token)
    try:
        return float(claims["exp"]) if claims is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def loose_permissions(path: Path) -> str | None:
    """A warning when the secret in ``path`` is readable by its group or others."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o077 == 0:
        return None
    return (
        f"{path} is readable by {'others' if mode & 0o004 else 'its group'}"
        f" (mode {mode & 0o777:o}): it holds a token; run chmod 600 {path}"
    )


def token_expires_in(token: str) -> float | None:
    """Seconds until the token's ``exp`` (read, not verified: the relay verifies it)."""
    exp = token_exp(token)
    return None if exp is None else exp - time.time()


def keyring_available() -> bool:
    """Whether an OS keyring would keep the token: a plaintext backend (keyrings.alt's
    ``PlaintextKeyring`` and the like) counts as none, so a long-lived token is never
    written to disk in the clear without ``--insecure-storage``."""
    return _plaintext_reason() is None


NO_KEYRING = "no keyring backend is available"


def _plaintext_reason() -> str | None:
    """Why the keyring backend would not protect a token, or None when it would."""
    import keyring
    from keyring.backends import chainer, fail

    backend = keyring.get_keyring()
    if isinstance(backend, chainer.ChainerBackend):  # it writes to its first backend
        chained = backend.backends
        if not chained:
            return NO_KEYRING
        backend = chained[0]
    if isinstance(backend, fail.Keyring) or backend.priority <= 0:
        return NO_KEYRING
    # keyring's own scale: below 1 is "not recommended" (keyrings.alt's file backends: 0.5)
    if backend.priority < 1 or type(backend).__module__.startswith("keyrings.alt"):
        return f"the keyring backend {backend.name} is not an OS keyring (it may keep plaintext)"
    return None


#: the keyring service join and login write into the configs they create
KEYRING_SERVICE = "cloudbridge"


@dataclass(frozen=True)
class StoredTokens:
    """The tokens of one relay (``account``: its host): in a 0600 ``token_file`` when one
    is given, else in the OS keyring under ``keyring_service``."""

    account: str
    keyring_service: str
    token_file: Path | None = None

    @classmethod
    def of(cls, auth: AuthSettings, account: str) -> StoredTokens:
        """Where the ``auth`` section says the tokens of ``account`` are kept."""
        if auth.token_storage != "file":  # noqa: S105 - a storage kind, not a password
            return cls(account, auth.keyring_service)
        if not auth.token_file:
            raise AuthError("auth.token_storage is file but auth.token_file is not set")
        return cls(account, auth.keyring_service, Path(auth.token_file))

    @classmethod
    def written(cls, storage: Mapping[str, Any], account: str) -> StoredTokens:
        """The store that :func:`storage_settings` just chose."""
        token_file = storage.get("token_file")
        return cls(account, KEYRING_SERVICE, Path(token_file) if token_file else None)

    @property
    def in_file(self) -> bool:
        return self.token_file is not None

    def _file(self, kind: str) -> Path:
        assert self.token_file is not None
        path = self.token_file
        return path if kind == "access" else path.with_name(f"{path.name}.{kind}")

    def _entry(self, kind: str) -> str:
        return self.account if kind == "access" else f"{self.account}#{kind}"

    def load(self, kind: str = "access") -> str | None:
        """The token, or None when none is kept (a missing keyring keeps none)."""
        if self.in_file:
            try:
                return self._file(kind).read_text().strip() or None
            except FileNotFoundError:
                return None
        import keyring.errors

        try:
            return keyring.get_password(self.keyring_service, self._entry(kind))
        except keyring.errors.KeyringError:
            return None

    def ensure_keepable(self) -> None:
        """Raise ``AuthError`` when :meth:`save` would have no OS keyring to write to (before
        a login spends a device code on a token it could not keep)."""
        if not self.in_file:
            _require_keyring(
                "set auth.token_storage: file and auth.token_file to keep it in a 0600 file"
            )

    def save(self, token: str, kind: str = "access") -> None:
        if self.in_file:
            write_secret(self._file(kind), token.encode())
            return
        self.ensure_keepable()
        import keyring

        keyring.set_password(self.keyring_service, self._entry(kind), token)

    def where(self) -> str:
        if self.in_file:
            return f"file {self.token_file}"
        import keyring

        plaintext = _plaintext_reason()
        if plaintext == NO_KEYRING:  # never keyring's own name for it ("fail Keyring")
            return f"OS keyring (service {self.keyring_service!r}); {plaintext}"
        where = f"keyring {keyring.get_keyring().name} (service {self.keyring_service!r})"
        return where if plaintext is None else f"{where}; {plaintext}"


def storage_settings(directory: Path, *, insecure: bool) -> dict[str, Any]:
    """The ``auth`` settings for tokens obtained by join or login: the keyring, or with
    ``insecure`` a 0600 file in ``directory``; fails closed when there is no keyring."""
    if insecure:
        return {"token_storage": "file", "token_file": str((directory / "token").absolute())}
    _require_keyring()
    return {"token_storage": "keyring", "keyring_service": KEYRING_SERVICE}


def _require_keyring(
    hint: str = "pass --insecure-storage to keep it in a 0600 file instead",
) -> None:
    reason = _plaintext_reason()
    if reason is not None:
        raise AuthError(f"no OS keyring is available here to keep the token: {reason}", hint=hint)


class TokenSupply:
    """The token the client presents, looked up (and renewed) before each connection."""

    def __init__(self, config: Config, plugins: Plugins | None = None) -> None:
        self._config = config
        auth = config.settings.auth
        self.stored = StoredTokens.of(auth, config.settings.relay.host)
        self._source: TokenSource | None = None
        kind = auth.type
        spec = plugins.auth_providers().get(kind) if plugins is not None else None
        if plugins is not None and spec is not None and spec.token_source is not None:
            try:
                self._source = spec.token_source(
                    plugins.settings_for("auth_provider", kind, config.converted)
                )
            except ValueError as exc:  # the provider's own check of its settings
                section = plugins.section_path("auth_provider", kind) or f"auth.{kind}"
                raise ConfigError([ConfigIssue(section, str(exc))]) from None

    def _explicit(self) -> tuple[str, str] | None:
        token = self._config.settings.auth.token
        if token:
            return token, str(self._config.origin(("auth", "token")))
        token = os.environ.get("CLOUDBRIDGE_TOKEN")
        if token:
            return token, "env CLOUDBRIDGE_TOKEN"
        return None

    async def token(self) -> str:
        explicit = self._explicit()
        if explicit is not None:
            return explicit[0]
        if self._source is not None:
            token = await self._source.obtain_token(self.stored)
        else:
            token = self.stored.load()
        if not token:
            raise AuthError(f"no token: none is kept in the {self.where()}", hint=ONBOARDING_HINT)
        return token

    async def require(self, permission: str, needed_for: str) -> None:
        """:func:`require_permission` on the token this client would present
        (``await tokens.require("tunnel:create", "a tunnel")`` before connecting)."""
        require_permission(await self.token(), permission, needed_for)

    def where(self) -> str:
        """Where the token comes from, for status and health (never the token itself)."""
        explicit = self._explicit()
        return explicit[1] if explicit is not None else self.stored.where()
