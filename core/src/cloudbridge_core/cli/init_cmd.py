"""``cloudbridge init``: a wizard that writes a config passing ``config validate``.

It asks for the relay, the transport, the auth type and the token (or an OIDC login), the
metrics endpoint and whether to install the service; each answer is checked when given and
asked again if wrong. Every question is also a flag: ``--non-interactive`` takes flags
only, and a missing required one is an error naming it. ``--reauth`` asks only the
authentication questions of an existing config and keeps everything else.
"""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from cloudbridge_core.cli.join_cmd import default_config_dir
from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.runtime import Runtime, runtime_of
from cloudbridge_core.cli.service_cmd import install
from cloudbridge_core.client.connection import transport_order
from cloudbridge_core.client.race import race
from cloudbridge_core.client.tokens import (
    StoredTokens,
    jwt_problem,
    keyring_available,
    storage_settings,
)
from cloudbridge_core.config import Config, validate
from cloudbridge_core.config.schema import defaults
from cloudbridge_core.errors import AuthError, CloudBridgeError, ExitCode, UsageError

T = TypeVar("T")
DEFAULT_METRICS_PORT = 9464


class Wizard:
    """Asks a question, or takes its flag; checks the answer either way."""

    def __init__(
        self,
        flags: Mapping[str, Any],
        interactive: bool,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self._flags = flags
        self.interactive = interactive
        #: the option that gave an answer, where it is not ``--<flag>`` (the token: --token-stdin)
        self._hints = hints or {}

    def ask(
        self,
        flag: str,
        prompt: str,
        check: Callable[[str], T],
        default: str | None = None,
        *,
        hide: bool = False,
    ) -> T:
        given = self._flags.get(flag)
        option = self._hints.get(flag, "--" + flag.replace("_", "-"))
        if given is not None:
            try:
                return check(str(given))
            except click.BadParameter as bad:
                raise click.BadParameter(bad.message, param_hint=option) from None
        if not self.interactive:
            if default is None:
                raise click.UsageError(f"{option} is required with --non-interactive")
            return check(default)
        answer: T = click.prompt(
            prompt, default=default, value_proc=check, hide_input=hide, err=True
        )
        return answer

    def given(self, flag: str) -> Any:
        return self._flags.get(flag)

    def confirm(self, flag: str, prompt: str, default: bool) -> bool:
        given = self._flags.get(flag)
        if given is not None:
            return bool(given)
        if not self.interactive:
            return default
        return click.confirm(prompt, default=default, err=True)


def _host(text: str) -> str:
    host = text.strip()
    if not host or any(c in host for c in " /\\@?#") or "://" in host:
        raise click.BadParameter(f"{text!r} is not a host name or address (no scheme or path)")
    return host


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise click.BadParameter(f"{text!r} is not a port (1-65535)")
    return int(text)


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.strip() not in options:
            raise click.BadParameter(f"{text!r} is not one of {', '.join(options)}")
        return text.strip()

    return check


def _ca_file(text: str) -> str | None:
    if not text.strip() or text.strip() == "system":
        return None
    path = Path(text.strip()).expanduser().resolve()
    try:
        pem = path.read_text()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise click.BadParameter(f"{path} holds no PEM certificate")
    return str(path)


def _url(text: str) -> str:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise click.BadParameter(f"{text!r} is not an http(s) URL")
    return text.strip()


def _token_of(kind: str) -> Callable[[str], str | None]:
    """The check of a token for auth ``kind``: a jwt token must at least parse as a JWT."""

    def check(text: str) -> str | None:
        token = text.strip()
        if not token:
            return None  # CLOUDBRIDGE_TOKEN at run time
        if any(c.isspace() for c in token):
            raise click.BadParameter("a token has no spaces")
        problem = jwt_problem(token) if kind == "jwt" else None
        if problem:
            raise click.BadParameter(
                f"this is not a JWT ({problem}); give the token 'cloudbridge relay token issue'"
                " printed, or one from your identity provider"
            )
        return token

    return check


def _name(text: str) -> str:
    if not text.strip():
        raise click.BadParameter("it cannot be empty")
    return text.strip()


@click.command()
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where config.yaml (and with --insecure-storage the token) go.",
    show_default="the user config directory",
)
@click.option("--non-interactive", is_flag=True, help="Ask nothing: take every answer from flags.")
@click.option("--reauth", is_flag=True, help="Redo only the authentication of an existing config.")
@click.option("--relay-host", help="The relay's host name or address.")
@click.option("--transport", help="auto, or one transport: tls, websocket, grpc, quic.")
@click.option("--relay-port", help="The relay's port for that transport (not with auto).")
@click.option("--ca-file", help="PEM CA of the relay's certificate ('system': the OS store).")
@click.option("--auth", "auth_type", help="jwt or oidc (or another installed auth provider).")
@click.option("--token-stdin", is_flag=True, default=None, help="jwt: read the token from stdin.")
@click.option("--oidc-issuer", help="oidc: the OpenID Provider's URL.")
@click.option("--oidc-client-id", help="oidc: the client id for cloudbridge login.")
@click.option("--login/--no-login", default=None, help="oidc: log in now.")
@click.option(
    "--insecure-storage",
    is_flag=True,
    default=None,
    help="Keep the token in a 0600 file when no OS keyring is available.",
)
@click.option("--metrics/--no-metrics", default=None, help="Serve Prometheus /metrics.")
@click.option("--metrics-port", help=f"The /metrics port (default {DEFAULT_METRICS_PORT}).")
@click.option("--service/--no-service", default=None, help="Install the system service now.")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not contact the relay to check that it accepts the token.",
)
@click.pass_context
def init(ctx: click.Context, /, config_dir: Path | None, **flags: Any) -> None:
    """Write a config for this machine by answering a few questions.

    A token given is checked: it must be a JWT (auth jwt), and unless --no-verify the
    relay must accept it when it can be reached (a refused token exits 4, writing nothing).
    """
    runtime = runtime_of(ctx)
    interactive = not flags.pop("non_interactive")
    reauth = flags.pop("reauth")
    verify = not flags.pop("no_verify")
    hints: dict[str, str] = {}
    if flags.pop("token_stdin"):
        hints["token"] = "--token-stdin"  # noqa: S105 - the flag's name, not a secret
        flags["token"] = sys.stdin.readline().strip()
        if not flags["token"]:
            raise click.BadParameter("stdin gave no token", param_hint="--token-stdin")
    if interactive and not sys.stdin.isatty():
        raise UsageError("no terminal to ask questions on", hint="pass --non-interactive")
    # absolute, so the paths written into it work from any directory (a service runs from /)
    config_file = Path(os.path.abspath(config_dir or default_config_dir())) / "config.yaml"
    wizard = Wizard(flags, interactive, hints)
    if reauth:
        document = _existing(config_file)
    elif config_file.exists():
        raise UsageError(
            f"{config_file} exists already",
            hint="--reauth redoes only authentication; or remove it, or give another --config-dir",
        )
    else:
        document = _connection(wizard, runtime)
    relay_host = document["relay"]["host"]
    document["auth"], token = _auth(wizard, runtime, config_file.parent)
    if not reauth:
        document["metrics"] = _metrics(wizard)
    checked = _check(runtime, config_file, document)
    if token is not None and verify:
        _verify(runtime, checked, token)
    config_file.parent.mkdir(parents=True, exist_ok=True)
    if token is not None:
        StoredTokens.of(checked.settings.auth, relay_host).save(token)
    _write(config_file, document)
    message(f"wrote {config_file}")
    runtime.use_config(str(config_file))
    if document["auth"]["type"] == "oidc" and wizard.confirm("login", "Log in now?", True):
        ctx.invoke(_command(ctx, "login"))
    if not reauth and wizard.confirm("service", "Install the system service now?", False):
        ctx.invoke(install)
    message(f"next: cloudbridge p2p --config {config_file}   (or cloudbridge tunnel ...)")


def _existing(config_file: Path) -> dict[str, Any]:
    """The config --reauth redoes; it must name its relay."""
    if not config_file.exists():
        raise UsageError(f"{config_file} does not exist: --reauth redoes an existing config")
    try:
        document = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{config_file} is not YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance((document.get("relay") or {}), dict):
        raise UsageError(f"{config_file} is not a CloudBridge config")
    if not isinstance(document.get("relay", {}).get("host"), str):
        raise UsageError(f"{config_file} names no relay.host", hint="run init without --reauth")
    return document


def _connection(wizard: Wizard, runtime: Runtime) -> dict[str, Any]:
    host = wizard.ask("relay_host", "Relay host", _host)
    transports = ["auto", *runtime.plugins.transports()]
    mode = wizard.ask(
        "transport", f"Transport ({', '.join(transports)})", _choice(transports), "auto"
    )
    relay: dict[str, Any] = {"host": host}
    transport: dict[str, Any] = {"mode": mode}
    if mode != "auto":  # the port lives in the transport's own section, as relay serve writes it
        default = defaults(runtime.schema).get("transport", {}).get(mode, {}).get("port")
        port = None if default is None else str(default)
        transport[mode] = {"port": wizard.ask("relay_port", f"{mode} port", _port, port)}
    ca_file = wizard.ask(
        "ca_file", "CA certificate of the relay (PEM file, or 'system')", _ca_file, "system"
    )
    if ca_file:
        relay["tls"] = {"ca_file": ca_file}
    return {"relay": relay, "transport": transport}


def _auth(wizard: Wizard, runtime: Runtime, directory: Path) -> tuple[dict[str, Any], str | None]:
    """The ``auth`` section, and the token to keep (None: none given now)."""
    kinds = list(runtime.plugins.auth_providers())
    kind = wizard.ask("auth_type", f"Authentication ({', '.join(kinds)})", _choice(kinds), "jwt")
    auth: dict[str, Any] = {"type": kind}
    token = None
    if kind == "oidc":
        auth["oidc"] = {
            "issuer": wizard.ask("oidc_issuer", "OpenID Provider (issuer URL)", _url),
            "client_id": wizard.ask("oidc_client_id", "Client id", _name, "cloudbridge-cli"),
        }
    else:
        token = wizard.ask(
            "token",
            "Token (input hidden; empty: read $CLOUDBRIDGE_TOKEN when running)",
            _token_of(kind),
            "",
            hide=True,
        )
        if token is None:
            return auth, None
    auth.update(_storage(wizard, directory))
    return auth, token


def _storage(wizard: Wizard, directory: Path) -> dict[str, Any]:
    insecure = bool(wizard.given("insecure_storage"))
    if not insecure and not keyring_available():
        insecure = wizard.confirm(
            "insecure_storage",
            "No OS keyring is available here. Keep the token in a 0600 file instead?",
            False,
        )
        if not insecure:
            raise AuthError(
                "no OS keyring is available here to keep the token",
                hint="pass --insecure-storage to keep it in a 0600 file instead",
            )
    return storage_settings(directory, insecure=insecure)


def _metrics(wizard: Wizard) -> dict[str, Any]:
    if not wizard.confirm("metrics", "Serve Prometheus metrics?", True):
        return {"enabled": False}
    port = wizard.ask("metrics_port", "Metrics port", _port, str(DEFAULT_METRICS_PORT))
    return {"enabled": True, "prometheus_port": port}


def _check(runtime: Runtime, config_file: Path, document: dict[str, Any]) -> Config:
    """Validate what would be written, as ``config validate`` will (ConfigError if not)."""
    candidate = config_file.with_name(f".{config_file.name}.{os.getpid()}")
    candidate.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write(candidate, document)
        return validate(runtime.read(candidate), runtime.schema)
    finally:
        candidate.unlink(missing_ok=True)


def _verify(runtime: Runtime, config: Config, token: str) -> None:
    """Connect to the relay with ``token`` as the client will: a refusal (the token, or the
    relay's certificate) is raised; a relay out of reach is only a warning."""

    async def attempt() -> None:
        candidates = transport_order(config, runtime.plugins)
        head_start = config.settings.transport.race_head_start
        connection, _ = await race(config, candidates, head_start, token)
        await connection.aclose()

    relay = config.settings.relay.host
    try:
        asyncio.run(asyncio.wait_for(attempt(), config.settings.transport.connect_timeout + 1))
    except CloudBridgeError as error:
        if error.exit_code == ExitCode.AUTH:
            error.message = f"the relay at {relay} refused the connection: {error.message}"
            error.hint = (
                "check the token (cloudbridge relay token issue prints a new one) and"
                " --ca-file; --no-verify skips this check"
            )
            raise error from None
        message(f"warning: could not check the token with the relay at {relay}: {error.message}")
    except TimeoutError:
        message(f"warning: could not check the token: no answer from the relay at {relay}")
    else:
        message(f"the relay at {relay} accepted the token")


def _write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(
        "# Written by 'cloudbridge init' (--reauth redoes authentication only).\n"
        + yaml.safe_dump(document, sort_keys=False)
    )


def _command(ctx: click.Context, name: str) -> click.Command:
    root = ctx.find_root()
    group = root.command
    command = group.get_command(root, name) if isinstance(group, click.Group) else None
    if command is None:
        raise UsageError(f"the {name!r} command is not available (is its plugin installed?)")
    return command
