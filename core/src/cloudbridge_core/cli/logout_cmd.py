"""``cloudbridge logout``: forget the token kept for the config's relay (in the OS keyring,
or the 0600 file ``auth.token_file``), with its refresh token when there is one."""

from __future__ import annotations

import click

from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.runtime import config_option, runtime_of
from cloudbridge_core.client.tokens import StoredTokens
from cloudbridge_core.errors import AuthError

#: the kinds of token login and join keep (refresh tokens under "<account>#refresh")
KINDS = ("access", "refresh")


@click.command()
@config_option
@click.pass_context
def logout(ctx: click.Context) -> None:
    """Forget the token kept for the config's relay (keyring or token file)."""
    config = runtime_of(ctx).config()
    host = config.settings.relay.host
    stored = StoredTokens.of(config.settings.auth, host)
    forgotten = [kind for kind in KINDS if _forget(stored, kind)]
    where = stored.where()
    if forgotten:
        message(f"forgot the token for {host} ({where})")
    else:
        message(f"no token was kept for {host} in the {where}")
    if config.settings.auth.token:
        origin = config.origin(("auth", "token"))
        message(f"note: a token is still given by {origin} (auth.token): remove it there")


def _forget(stored: StoredTokens, kind: str) -> bool:
    """Remove one kind of token; whether there was one."""
    if stored.token_file is not None:
        path = stored.token_file
        path = path if kind == "access" else path.with_name(f"{path.name}.{kind}")
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise AuthError(f"cannot remove {path}: {exc.strerror or exc}") from None
        return True
    import keyring  # noqa: PLC0415 - keyring's backends load slowly; file storage needs none
    import keyring.errors  # noqa: PLC0415 - as above

    entry = stored.account if kind == "access" else f"{stored.account}#{kind}"
    try:
        keyring.delete_password(stored.keyring_service, entry)
    except (keyring.errors.PasswordDeleteError, keyring.errors.NoKeyringError):
        # a machine without a keyring kept nothing in one
        return False
    except keyring.errors.KeyringError as exc:
        raise AuthError(
            f"cannot reach the OS keyring to forget the token: {exc}",
            hint="unlock the keyring (a desktop session) and try again",
        ) from None
    return True
